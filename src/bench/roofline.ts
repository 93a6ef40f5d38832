/**
 * Roofline of decoding: a decode step at batch B must read every weight it uses once (the batch
 * shares the read), so on a bandwidth-bound device the best possible step rate is
 * bandwidth / weight bytes per step. Dense models read all their weights each step; an MoE layer
 * reads only the experts its B tokens route to. With k of E experts chosen per token and routing
 * spread evenly, a given expert is missed by all B tokens with probability (1 - k/E)^B, so the
 * expected number of distinct experts read is E·(1 - (1 - k/E)^B).
 *
 * KV-cache reads are left out: they grow with context and are small next to the weights at the
 * short contexts of the batched sweep.
 */
import type { GgufFile } from '../gguf/index.js';
import type { RooflineRow } from './types.js';

export function expectedExperts(nExpert: number, nExpertUsed: number, batch: number): number {
  if (nExpert <= 0) return 0;
  return nExpert * (1 - Math.pow(1 - nExpertUsed / nExpert, batch));
}

/** Weight bytes one decode step reads at batch `batch`, from the tensor table of the GGUF. */
export function weightBytesPerStep(gguf: Pick<GgufFile, 'metadata' | 'tensors'>, batch: number): { bytes: number; expertsPerLayer: number } {
  const arch = String(gguf.metadata.get('general.architecture')?.value ?? '');
  const num = (key: string) => Number(gguf.metadata.get(`${arch}.${key}`)?.value ?? 0);
  const nExpert = num('expert_count');
  const experts = expectedExperts(nExpert, num('expert_used_count'), batch);
  const tied = !gguf.tensors.some((t) => t.name === 'output.weight');
  let bytes = 0;
  for (const t of gguf.tensors) {
    if (t.name === 'token_embd.weight' && !tied) {
      // Only the B rows of the batch's tokens are gathered.
      bytes += (t.byteSize / (t.shape[1] ?? 1)) * Math.min(batch, t.shape[1] ?? 1);
    } else if (/_exps\.weight$/.test(t.name) && nExpert > 0) {
      bytes += (t.byteSize / nExpert) * experts;
    } else {
      bytes += t.byteSize;
    }
  }
  return { bytes, expertsPerLayer: experts };
}

/** Roofline rows for the measured aggregate decode rates (tokens/s) at each batch size. */
export function roofline(
  gguf: Pick<GgufFile, 'metadata' | 'tensors'>,
  bandwidthBytesPerSecond: number,
  measured: ReadonlyArray<{ concurrency: number; tokensPerSecond: number }>,
): RooflineRow[] {
  return measured.map(({ concurrency, tokensPerSecond }) => {
    const { bytes, expertsPerLayer } = weightBytesPerStep(gguf, concurrency);
    const idealStepsPerSecond = bandwidthBytesPerSecond / bytes;
    const idealTokensPerSecond = idealStepsPerSecond * concurrency;
    return {
      concurrency,
      expertsPerLayer,
      weightBytesPerStep: bytes,
      idealStepsPerSecond,
      idealTokensPerSecond,
      measuredTokensPerSecond: tokensPerSecond,
      fraction: tokensPerSecond / idealTokensPerSecond,
    };
  });
}
