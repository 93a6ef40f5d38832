/**
 * Speculative decoding, measured against llama.cpp's own llama-speculative-simple on the same
 * models: single-stream generation speed of the target alone, with a draft model (ours), and with
 * the reference tool, at several acceptance rates.
 *
 * Agreement is set, not hoped for: the target is a preset shape whose layers 1 and up are scaled
 * down by `scale` (SyntheticModelOptions.quietLayers), the draft is the same preset with only its
 * first layer (same seed: the same embeddings, layer 0 and output). The target still computes every
 * layer; the larger `scale`, the more its later layers change its choice and the less the draft
 * agrees (random-weight models of different depths agree about 1 % of the time otherwise).
 *
 * With `mtp` the drafts come from the target's own multi-token-prediction block instead (a preset
 * with one, such as glm-4.5-air), against `llama-speculative-simple --spec-type draft-mtp`. The
 * synthetic MTP block predicts what the trunk would predict for the next token from its embedding
 * (SyntheticModelOptions.mtpLayers), so here every layer is scaled by `scale`, from layer 0 up.
 */
import { ensureReferenceTool } from '../../scripts/llama.mjs';
import { loadModel } from '../model.js';
import { ensureBenchModel, specLabel, type BenchModelSpec } from './models.js';
import { runTool } from './reference.js';

export interface SpeculativeOptions {
  target: BenchModelSpec;
  scales: number[];
  draftTokens: number;
  genTokens: number;
  threads: number;
  gpuLayers: number;
  repeat: number;
  /** Draft with the target's MTP layers instead of a 1-layer draft model. */
  mtp?: boolean;
  modelCacheDir?: string;
  log: (line: string) => void;
}

export interface SpeculativeRow {
  scale: number;
  /** Share of drafted tokens kept: ours, and llama-speculative-simple's. */
  acceptance: { ours: number; reference: number };
  /** Generated tokens/s after the first: target alone, with the draft, and the reference tool. */
  alone: number;
  ours: number;
  reference: number;
}

export interface SpeculativeResult {
  target: string;
  draft: string;
  /** Drafted by the target's own MTP layers (else by the draft model `draft`). */
  mtp: boolean;
  draftTokens: number;
  genTokens: number;
  rows: SpeculativeRow[];
}

const PROMPT = 'The history of the old city begins with';

/** llama-speculative-simple's closing lines: decode speed and acceptance. */
export function parseSpeculativeSimple(text: string): { tokensPerSecond: number; drafted: number; accepted: number } {
  const speed = /decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t\/s/.exec(text);
  const drafted = /n_drafted\s*=\s*(\d+)/.exec(text);
  const accepted = /n_accept\s*=\s*(\d+)/.exec(text);
  if (!speed || !drafted || !accepted) throw new Error(`could not read llama-speculative-simple's summary from:\n${text.slice(-1500)}`);
  return { tokensPerSecond: Number(speed[1]), drafted: Number(drafted[1]), accepted: Number(accepted[1]) };
}

export async function measureSpeculative(o: SpeculativeOptions): Promise<SpeculativeResult> {
  const mtp = o.mtp ?? false;
  const draftSpec: BenchModelSpec = { preset: o.target.preset, type: o.target.type, layers: 1 };
  if (!mtp) o.log(`preparing the draft ${specLabel(draftSpec)} (generated once, then cached)`);
  const draftPath = mtp ? '' : await ensureBenchModel(draftSpec, o.modelCacheDir);
  const tool = ensureReferenceTool('llama-speculative-simple');
  const context = 64 + o.genTokens + o.draftTokens + 8;
  const load = { contextSize: context, maxSequences: 1, batchSize: 512, threads: o.threads, gpuLayers: o.gpuLayers };
  const greedy = { maxTokens: o.genTokens, temperature: 0, ignoreEos: true };
  const rows: SpeculativeRow[] = [];
  let step = 0;
  const steps = o.scales.length * o.repeat;
  for (const scale of o.scales) {
    const spec: BenchModelSpec = { ...o.target, quiet: scale, quietFrom: mtp ? 0 : 1 };
    o.log(`[${++step}/${steps}] scale ${scale}: preparing ${specLabel(spec)} with layers ${mtp ? 0 : 1}+ scaled by ${scale}`);
    const targetPath = await ensureBenchModel(spec, o.modelCacheDir);
    const row: SpeculativeRow = { scale, acceptance: { ours: 0, reference: 0 }, alone: 0, ours: 0, reference: 0 };
    for (let round = 0; round < o.repeat; round++) {
      if (round > 0) o.log(`[${++step}/${steps}] scale ${scale}: round ${round + 1}`);
      const args = [
        '-m', targetPath, ...(mtp ? [] : ['-md', draftPath]), '-p', PROMPT, '-n', String(o.genTokens),
        '--spec-type', mtp ? 'draft-mtp' : 'draft-simple', '--spec-draft-n-max', String(o.draftTokens), '--spec-draft-n-min', '0',
        '--spec-draft-p-min', '0', '--temp', '0', '--ignore-eos', '-c', String(context), '-t', String(o.threads), '-ngl', String(o.gpuLayers),
        '-ngld', String(o.gpuLayers), '-s', '1',
      ];
      const { stdout, stderr } = await runTool(tool, args, o.log);
      const ref = parseSpeculativeSimple(stderr + stdout);
      row.reference = Math.max(row.reference, ref.tokensPerSecond);
      row.acceptance.reference = ref.drafted > 0 ? ref.accepted / ref.drafted : 0;

      const draft = mtp ? undefined : await loadModel(draftPath, load);
      const target = await loadModel(targetPath, {
        ...load,
        draft: draft ? { model: draft, maxTokens: o.draftTokens } : { mtp: true, maxTokens: o.draftTokens },
      });
      try {
        await target.complete(PROMPT, { ...greedy, maxTokens: 4 }); // warm-up: graphs and pages
        const alone = await target.complete(PROMPT, { ...greedy, draft: false });
        const drafted = await target.complete(PROMPT, greedy);
        if (drafted.tokens.join() !== alone.tokens.join()) o.log(`scale ${scale}: WARNING: the drafted output differs from the target's own`);
        row.alone = Math.max(row.alone, alone.timings.tokensPerSecond);
        row.ours = Math.max(row.ours, drafted.timings.tokensPerSecond);
        row.acceptance.ours = drafted.speculative?.acceptanceRate ?? 0;
      } finally {
        await target.dispose();
        await draft?.dispose();
      }
    }
    o.log(
      `scale ${scale}: acceptance ${(row.acceptance.ours * 100).toFixed(0)} % (llama.cpp ${(row.acceptance.reference * 100).toFixed(0)} %), ` +
        `alone ${row.alone.toFixed(1)} t/s, with draft ${row.ours.toFixed(1)} t/s (${(row.ours / row.alone).toFixed(2)}×), llama-speculative-simple ${row.reference.toFixed(1)} t/s`,
    );
    rows.push(row);
  }
  return { target: specLabel(o.target), draft: mtp ? 'its own MTP layer' : specLabel(draftSpec), mtp, draftTokens: o.draftTokens, genTokens: o.genTokens, rows };
}

export function formatSpeculativeTable(r: SpeculativeResult): string {
  const lines = [
    `target ${r.target} (layers ${r.mtp ? 0 : 1}+ scaled), draft ${r.draft}, ${r.draftTokens} drafted per step, ${r.genTokens} tokens, greedy`,
    '',
    '| scale | acceptance (ours / llama.cpp) | target alone t/s | with draft t/s | speed-up | llama-speculative-simple t/s | ratio to reference |',
    '|--:|--:|--:|--:|--:|--:|--:|',
  ];
  for (const row of r.rows) {
    lines.push(
      `| ${row.scale} | ${(row.acceptance.ours * 100).toFixed(0)} % / ${(row.acceptance.reference * 100).toFixed(0)} % | ${row.alone.toFixed(2)} | ${row.ours.toFixed(2)} | ` +
        `${(row.ours / row.alone).toFixed(2)} | ${row.reference.toFixed(2)} | ${(row.ours / row.reference).toFixed(2)} |`,
    );
  }
  return lines.join('\n');
}
