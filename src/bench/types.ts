/**
 * The benchmark harness's report: one JSON document per run, from which the markdown table and the
 * HTML report are rendered. Every figure sits next to its reference (llama.cpp's own tool, built
 * from the same source, run in the same process tree on the same GGUF with the same settings).
 */

/** Latency percentiles in milliseconds. */
export interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
  mean: number;
}

/** One load-generator run against one server (ours or llama-server). */
export interface LoadStats {
  requests: number;
  completed: number;
  errors: number;
  /** First error message seen, if any (for the report; errors make the figure suspect). */
  firstError?: string;
  durationSeconds: number;
  /** Completion tokens of all requests / wall time. */
  outputTokensPerSecond: number;
  requestsPerSecond: number;
  /** Time to first token. */
  ttftMs: Percentiles;
  /** Time per output token after the first: (end - first token) / (tokens - 1), per request. */
  tpotMs: Percentiles;
  /** Whole request, send to last byte. */
  e2eMs: Percentiles;
}

/** A value of ours and the reference's for the same measurement; ratio = ours / reference. */
export interface Paired<T> {
  ours: T;
  reference: T;
}

export interface SingleStreamRow {
  /** 'pp' (prompt processing of `tokens` tokens) or 'tg' (generating `tokens` tokens). */
  test: 'pp' | 'tg';
  tokens: number;
  /** tokens/s. Reference: llama-bench. */
  ours: number;
  reference: number;
}

export interface BatchedRow {
  concurrency: number;
  promptTokens: number;
  genTokens: number;
  /** Aggregate generation tokens/s (all sequences). Reference: llama-batched-bench S_TG. */
  ours: number;
  reference: number;
  /** Whole run, prompt and generation, tokens/s (llama-batched-bench's S). */
  oursTotal: number;
  referenceTotal: number;
}

export interface LatencyRow extends Paired<LoadStats> {
  concurrency: number;
  promptTokens: number;
  genTokens: number;
}

export interface SharedPrefixResult extends Paired<LoadStats> {
  requests: number;
  concurrency: number;
  prefixTokens: number;
  suffixTokens: number;
  genTokens: number;
  /**
   * Time to first token of one request alone whose prefix nothing holds (cold), then of one with
   * the same prefix and another suffix (cached), in ms.
   */
  prefixCache?: Paired<PrefixCacheTtft>;
}

export interface PrefixCacheTtft {
  coldMs: number;
  cachedMs: number;
}

export interface MixedResult extends Paired<LoadStats> {
  requests: number;
  /** Mean arrival rate (Poisson arrivals), requests/s. */
  arrivalRate: number;
  promptTokens: [min: number, max: number];
  genTokens: [min: number, max: number];
  seed: number;
}

/** Weight bytes a decode step must read at batch B against the device's measured bandwidth. */
export interface RooflineRow {
  concurrency: number;
  /** Expected distinct experts touched per MoE layer at this batch (uniform routing); 0 for dense. */
  expertsPerLayer: number;
  weightBytesPerStep: number;
  /** bandwidth / bytes: steps per second if decode were purely weight-read bound. */
  idealStepsPerSecond: number;
  /** idealStepsPerSecond × B. */
  idealTokensPerSecond: number;
  /** Our aggregate decode tokens/s at this B (from the batched sweep). */
  measuredTokensPerSecond: number;
  /** measured / ideal. */
  fraction: number;
}

export interface BenchModelShape {
  preset: string;
  arch: string;
  type: string;
  nLayer: number;
  nEmbd: number;
  nHead: number;
  nHeadKv: number;
  headDim: number;
  nFf?: number;
  nExpert?: number;
  nExpertUsed?: number;
  nFfExp?: number;
  /** Expert groups (DeepSeek-V3-style group-limited routing): how many, and how many kept. */
  expertGroups?: { count: number; used: number };
  vocabSize: number;
  fileBytes: number;
  /** Total parameter count. */
  params: number;
}

export interface BenchModelRun {
  name: string;
  path: string;
  shape: BenchModelShape;
  single: SingleStreamRow[];
  batched: BatchedRow[];
  latency: LatencyRow[];
  sharedPrefix?: SharedPrefixResult;
  mixed?: MixedResult;
  roofline?: RooflineRow[];
  experts?: ExpertsResult;
  routing?: RoutingResult;
  kvPool?: KvPoolResult;
}

/**
 * Sequences held in one fixed KV budget: llama-server in its per-sequence mode (the budget split
 * into slots of the maximum context) against ours with one shared pool of the same size
 * (--kv-budget), the same short requests at the same client concurrency.
 */
export interface KvPoolResult {
  budgetTokens: number;
  maxContext: number;
  requests: number;
  concurrency: number;
  promptTokens: number;
  genTokens: number;
  /** Sequences each side held at once: llama-server's slots; ours, the most active seen. */
  referenceSequences: number;
  oursSequences: number;
  /** Ours: sequences preempted for room in the pool, and of those, copied back (--kv-swap) instead of recomputed. */
  oursPreemptions?: number;
  oursSwapIns?: number;
  ours: LoadStats;
  reference: LoadStats;
}

/**
 * MoE models: decode with expert statistics on against off (same batched workload, interleaved
 * fresh processes, best of each), and the per-layer expert load the counted runs saw.
 */
export interface ExpertsResult {
  concurrency: number;
  promptTokens: number;
  genTokens: number;
  /** Generation tokens/s, statistics on and off. */
  statsOn: number;
  statsOff: number;
  /** Tokens routed to each expert, per MoE layer, over one counted run. */
  layers: Array<{ layer: number; counts: number[] }>;
}

/**
 * fusedMoeRouting on against off (a model with expert groups): batched decode at each concurrency
 * of the sweep, in fresh interleaved processes, best of each.
 */
export interface RoutingResult {
  promptTokens: number;
  genTokens: number;
  rows: Array<{ concurrency: number; fusedOn: number; fusedOff: number }>;
}

/** One line of the ratio table: what the harness prints last. */
export interface RatioRow {
  model: string;
  /** 'pp', 'tg', 'batched', 'server', 'shared-prefix', 'mixed', 'experts', 'routing', 'kv-pool'. */
  workload: string;
  /** e.g. 'pp512', 'B=8'. */
  label: string;
  metric: string;
  unit: string;
  ours: number;
  reference: number;
  referenceTool: string;
  /** ours / reference for higher-is-better metrics, reference / ours for latencies. */
  ratio: number;
  /** Target ratio from the benchmark issue, where there is one. */
  target?: number;
  /**
   * Requests that failed, on either side, where the figures come from a load run: the comparison
   * then does not hold (a server that fails requests finishes sooner), and the target is not met.
   */
  failed?: { ours: number; reference: number };
}

/** Several devices: the same split for ours (loadModel options) and the references (-sm/-ts/-mg/--rpc). */
export interface SplitSettings {
  splitMode?: 'none' | 'layer' | 'row' | 'tensor';
  tensorSplit?: number[];
  mainGpu?: number;
  /** llama.cpp RPC servers (genesis rpc-server), host:port. */
  rpcServers?: string[];
}

export interface BenchSettings {
  quick: boolean;
  threads: number;
  batchSize: number;
  gpuLayers: number;
  split: SplitSettings;
  /** Best of this many interleaved rounds (ours, reference, ours, ...). */
  repeat: number;
  concurrency: number[];
  ppTokens: number[];
  tgTokens: number;
  /** Our server ran with paged attention over one shared KV pool (--kv-paged). */
  kvPaged?: boolean;
  /** With kvPaged: the pool's block size (--kv-block-size), when not 1. */
  kvBlockSize?: number;
  /** Ours copied preempted sequences' KV to this much host memory (--kv-swap). */
  kvSwapMemory?: number;
  /** Ours ran with group-limited MoE routing in one op (--fused-moe-routing). */
  fusedMoeRouting?: boolean;
}

/** `genesis bench --fusion`: one number of concurrent streams (all figures generated tokens/s). */
export interface FusionBenchRow {
  streams: number;
  /** Member A alone, member B alone: all streams together. */
  a: number;
  b: number;
  /** A and B each running `streams` generations at the same time: per model (half of both together). */
  separately: number;
  /** `streams` fused A+B generations. */
  fused: number;
  /** fused / separately: 1 = fusion costs nothing beyond running both models. */
  overhead: number;
}

export interface FusionBenchResult {
  /** The members: one preset, random weights of seeds 1 and 2. */
  a: string;
  b: string;
  weights: [number, number];
  genTokens: number;
  threads: number;
  gpuLayers: number;
  vocabSize: number;
  /** Devices holding layers besides the host (e.g. CUDA0); empty on a CPU-only run. */
  offload: string[];
  rows: FusionBenchRow[];
}

export interface BenchReport {
  version: 1;
  date: string;
  /** Wall time of the whole run. */
  durationSeconds: number;
  machine: { host: string; os: string; cpu: string; cores: number; memoryBytes: number };
  device: {
    /** Build variant of our addon (and of the reference tools): 'cpu' or 'cuda'. */
    variant: string;
    /** Human-readable: CPU model, or GPU name(s). */
    name: string;
    /** Memory read/write bandwidth measured in this run (bytes/s), if measured. */
    bandwidthBytesPerSecond?: number;
  };
  /** git commit of this repository, if known. */
  commit: string | null;
  llamaCommit: string;
  settings: BenchSettings;
  runs: BenchModelRun[];
  ratios: RatioRow[];
  /** `genesis bench --fusion`: logit fusion overhead (such a report has no runs or ratios). */
  fusion?: FusionBenchResult;
}
