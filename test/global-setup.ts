/**
 * Runs once before any test file: builds the llama.cpp reference tools the suites compare against
 * (same pinned source and flags as the addon). Built here, serially, rather than in each suite's
 * beforeAll, where two workers would wait on one another's build past their hook timeouts.
 * The first run on a fresh clone takes minutes on 2 cores; later runs find them built.
 */
import { ensureReferenceTool } from '../scripts/llama.mjs';

export default function setup(): void {
  for (const tool of ['llama-gguf-hash', 'llama-bench', 'llama-batched-bench', 'llama-server']) ensureReferenceTool(tool);
}
