/**
 * MoE expert routing, for checks and microbenchmarks (native/moe/route.h): which experts each
 * token goes to and with what weights, computed three ways on the same scores:
 *   'reference'  plain C++, the definition
 *   'graph'      llama.cpp's own op chain (build_moe_ffn's routing) on the CPU or a GPU backend
 *   'graph-op'   the same graph with expert groups chosen by one op, ggml_moe_group_topk
 *                (native/patches/0005-moe-group-topk.patch), as models load with fusedMoeRouting
 *   'fused'      our fused CUDA kernel (CUDA builds), optionally counting each expert's picks on the
 *                device
 * Synchronous: a diagnostic, not a serving path.
 */
import { binding } from './binding.js';
import { toGenesisError } from './errors.js';

export interface MoeRoutingParams {
  nExpert: number;
  nExpertUsed: number;
  /** Group-limited routing (DeepSeek-V3: 8 groups, 4 used). Default 1: no limit. */
  nGroups?: number;
  nGroupUsed?: number;
  /** How scores are made from the router's logits. Default 'softmax'. */
  scoring?: 'softmax' | 'sigmoid';
  /** Added to the scores for the choice only (DeepSeek-V3's e_score_correction_bias). */
  bias?: Float32Array;
  /** Weights divided by their sum. Default false. */
  norm?: boolean;
  /** Weights multiplied by this (routed_scaling_factor). Default 1. */
  scale?: number;
}

export interface MoeRoutingResult {
  /** nTokens × nExpertUsed expert ids, best first. */
  ids: Int32Array;
  weights: Float32Array;
  /** 'reference', or the ggml device / GPU name it ran on. */
  device: string;
  /** With `iterations`: mean seconds per call, each launched and waited for. */
  secondsPerCall: number;
  /** With `iterations`: mean seconds per call, the calls queued back to back and waited for once. */
  secondsPerCallPipelined: number;
  /** 'fused' with `counts`: how often each expert was chosen, counted on the device. */
  counts?: Uint32Array;
}

export function moeRoute(
  kind: 'reference' | 'graph' | 'graph-op' | 'fused',
  logits: Float32Array,
  nTokens: number,
  params: MoeRoutingParams,
  options: { device?: 'cpu' | 'gpu'; iterations?: number; counts?: boolean } = {},
): MoeRoutingResult {
  try {
    return binding().moeRoute(kind, logits, nTokens, params, options);
  } catch (error) {
    throw toGenesisError(error as { code: string; message: string });
  }
}

/** Routing shapes of real models, for tests and the microbenchmark. */
export const MOE_ROUTING_SHAPES = {
  'deepseek-v3': { nExpert: 256, nExpertUsed: 8, nGroups: 8, nGroupUsed: 4, scoring: 'sigmoid', norm: true, scale: 2.5 },
  'kimi-k2': { nExpert: 384, nExpertUsed: 8, scoring: 'sigmoid', norm: true, scale: 2.827 },
  'qwen3.5-397b-a17b': { nExpert: 512, nExpertUsed: 10, scoring: 'softmax', norm: true },
  'glm-4.5': { nExpert: 160, nExpertUsed: 8, scoring: 'sigmoid', norm: true, scale: 2.5 },
  'qwen3-30b-a3b': { nExpert: 128, nExpertUsed: 8, scoring: 'softmax', norm: true },
} as const satisfies Record<string, MoeRoutingParams>;
