/**
 * Logit fusion: several models that share a tokenizer generate one text together. At every step
 * each member decodes the same sequence in its own engine, batched with its other requests; their
 * log-probabilities are summed with the members' weights (a weighted geometric mean of their
 * distributions) and one sampler chooses the token, which every member then takes as its own. A
 * member with weight 0 still steps (it stays in lockstep) but does not vote.
 *
 *   const duo = fuse([{ model: a, weight: 0.7 }, { model: b, weight: 0.3 }]);
 *   const r = await duo.complete('Once upon a time', { maxTokens: 64, temperature: 0 });
 */
import { AbortError, InvalidOptionError } from './errors.js';
import type { Generation, GenerationResult } from './generation.js';
import { Model } from './model.js';
import { resolveSamplingOptions, type GenerateOptions } from './options.js';
import { mulberry32 } from './synthetic/models.js';

export interface FusionMember {
  model: Model;
  /** ≥ 0; the weights need not sum to 1 (they scale the summed log-probabilities). */
  weight: number;
}

/** Sampling options that fusion applies itself; the others (penalties, grammar, bias) it refuses. */
const UNSUPPORTED = ['repeatPenalty', 'frequencyPenalty', 'presencePenalty', 'grammar', 'logitBias', 'draft'] as const;

export class FusedModel {
  readonly members: ReadonlyArray<FusionMember>;

  constructor(members: FusionMember[]) {
    if (!Array.isArray(members) || members.length === 0) throw new InvalidOptionError('members', 'a non-empty array of { model, weight }', members);
    members.forEach((m, i) => {
      if (!m || !(m.model instanceof Model) || m.model.disposed) throw new InvalidOptionError(`members[${i}].model`, 'a loaded Model', m?.model);
      if (typeof m.weight !== 'number' || !Number.isFinite(m.weight) || m.weight < 0) {
        throw new InvalidOptionError(`members[${i}].weight`, 'a finite number ≥ 0', m.weight);
      }
    });
    if (!members.some((m) => m.weight > 0)) throw new InvalidOptionError('members', 'at least one weight > 0', members.map((m) => m.weight));
    const digest = members[0]!.model.vocabDigest();
    members.forEach((m, i) => {
      const other = m.model.vocabDigest();
      if (other !== digest) {
        throw new InvalidOptionError(
          `members[${i}].model`,
          `a model with the same tokenizer as members[0] (${members[0]!.model.path}: ${digest}); ${m.model.path} has ${other}`,
          m.model.path,
        );
      }
    });
    this.members = members.map((m) => ({ ...m }));
  }

  /**
   * Starts a fused generation. The returned Generation streams and resolves as any other; its
   * tokens are the fused choices. Options: maxTokens, temperature, topK, topP, minP, seed, stop,
   * ignoreEos, priority, signal (penalties, grammar and logitBias are not available with fusion).
   */
  generate(prompt: string | readonly number[], options: GenerateOptions = {}): Generation {
    for (const key of UNSUPPORTED) {
      if (options[key] !== undefined) throw new InvalidOptionError(key, 'not set: logit fusion samples the fused distribution itself (temperature, topK, topP, minP, seed)', options[key]);
    }
    const first = this.members[0]!.model;
    if (typeof prompt !== 'string') {
      // As Model.generate: ids outside the vocabulary never reach the engines.
      const vocabSize = first.info.vocabSize;
      if (!Array.isArray(prompt)) throw new InvalidOptionError('prompt', 'a string or an array of token ids', prompt);
      prompt.forEach((t: unknown, i) => {
        if (!Number.isInteger(t) || (t as number) < 0 || (t as number) >= vocabSize) throw new InvalidOptionError(`prompt[${i}]`, `a token id (integer in [0, ${vocabSize}))`, t);
      });
    }
    const tokens = typeof prompt === 'string' ? Int32Array.from(first.tokenize(prompt, { addSpecial: options.addSpecial ?? true })) : Int32Array.from(prompt);
    const sampler = fusedSampler(options, first.info.vocabSize);
    const controller = new AbortController();
    const forward = () => controller.abort();
    options.signal?.addEventListener('abort', forward, { once: true });
    // Members must end on the same token: where their contexts differ, the smallest one bounds the
    // output for all (as maxTokens, so that no member stops on its own for lack of room).
    const contexts = this.members.map((m) => m.model.info.context.contextSize);
    const room = Math.min(...contexts) - tokens.length - 1;
    const maxTokens = new Set(contexts).size > 1 && room >= 1 ? Math.min(options.maxTokens ?? Infinity, room) : options.maxTokens;
    const memberOptions: GenerateOptions = {
      maxTokens,
      stop: options.stop,
      ignoreEos: options.ignoreEos,
      priority: options.priority,
      seed: sampler.seed,
      signal: controller.signal,
    };
    const generations: Generation[] = [];
    try {
      for (const m of this.members) generations.push(m.model._generateExternal(tokens, memberOptions));
    } catch (error) {
      controller.abort();
      throw error;
    }
    if (options.signal?.aborted) controller.abort();
    // Each step: wait until every member has sent its logits, choose, feed the choice to all.
    const pending: Array<Float32Array | undefined> = generations.map(() => undefined);
    let arrived = 0;
    generations.forEach((g, i) => {
      g._onLogits = (logits) => {
        if (pending[i] === undefined) arrived++;
        pending[i] = logits;
        if (arrived < generations.length) return;
        const token = sampler.choose(pending as Float32Array[], this.members.map((m) => m.weight));
        pending.fill(undefined);
        arrived = 0;
        generations.forEach((h, j) => this.members[j]!.model._feed(h.id, token));
      };
    });
    // One member failing ends them all, with that member's error on the fused generation.
    const main = generations[0]!;
    generations.forEach((g) => {
      g.result.then(
        () => undefined,
        (error: unknown) => {
          if (!(error instanceof AbortError) || options.signal?.aborted) main._fail(error);
          controller.abort();
        },
      );
    });
    main.result.finally(() => options.signal?.removeEventListener('abort', forward)).catch(() => {});
    return main;
  }

  complete(prompt: string | readonly number[], options: GenerateOptions = {}): Promise<GenerationResult> {
    return this.generate(prompt, options).result;
  }
}

export function fuse(members: FusionMember[]): FusedModel {
  return new FusedModel(members);
}

interface FusedSampler {
  seed: number;
  choose(logits: Float32Array[], weights: number[]): number;
}

/**
 * The sampler over the weighted sum of log-softmaxes, in llama.cpp's order: top-k, top-p, min-p
 * on the fused distribution, then temperature and the draw. Temperature 0: the argmax (the first
 * of equals, as llama.cpp's greedy sampler).
 */
function fusedSampler(options: GenerateOptions, vocabSize: number): FusedSampler {
  // The same validation and defaults as any generation's sampler.
  const { temperature, topK, topP, minP, seed } = resolveSamplingOptions(options, vocabSize);
  const random = mulberry32(seed);
  return {
    seed,
    choose(logits, weights) {
      const n = logits[0]!.length;
      const fused = new Float64Array(n);
      logits.forEach((l, i) => {
        const w = weights[i]!;
        if (w === 0) return;
        let max = -Infinity;
        for (let j = 0; j < n; j++) if (l[j]! > max) max = l[j]!;
        let sum = 0;
        for (let j = 0; j < n; j++) sum += Math.exp(l[j]! - max);
        const lse = max + Math.log(sum);
        for (let j = 0; j < n; j++) fused[j]! += w * (l[j]! - lse);
      });
      if (temperature <= 0) {
        let best = 0;
        for (let j = 1; j < n; j++) if (fused[j]! > fused[best]!) best = j;
        return best;
      }
      let ids = Array.from({ length: n }, (_, j) => j).sort((a, b) => fused[b]! - fused[a]! || a - b);
      if (topK > 0) ids = ids.slice(0, topK);
      const top = fused[ids[0]!]!;
      let p = ids.map((j) => Math.exp(fused[j]! - top));
      let total = p.reduce((a, x) => a + x, 0);
      if (topP < 1) {
        let cum = 0;
        let keep = ids.length;
        for (let k = 0; k < ids.length; k++) {
          cum += p[k]! / total;
          if (cum >= topP) {
            keep = k + 1;
            break;
          }
        }
        ids = ids.slice(0, keep);
        p = p.slice(0, keep);
      }
      if (minP > 0) {
        const keep = p.filter((x) => x >= minP * p[0]!).length; // p is sorted, p[0] the largest
        ids = ids.slice(0, Math.max(1, keep));
        p = p.slice(0, ids.length);
      }
      // Temperature on the kept candidates, then the draw.
      const scaled = ids.map((j) => Math.exp((fused[j]! - top) / temperature));
      total = scaled.reduce((a, x) => a + x, 0);
      let r = random() * total;
      for (let k = 0; k < ids.length; k++) {
        r -= scaled[k]!;
        if (r < 0) return ids[k]!;
      }
      return ids[ids.length - 1]!;
    },
  };
}
