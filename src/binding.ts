/**
 * The native addon's surface, typed in one place, and the loader that finds the binary.
 * Nothing outside src/ touches these types: the public API wraps them.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GenesisError } from './errors.js';
import type { EngineStats } from './model.js';
import type { BandwidthOptions, BandwidthResult } from './system.js';

export interface NativeLoadOptions {
  contextSize: number;
  maxSequences: number;
  batchSize: number;
  gpuLayers: number;
  threads: number;
  kvUnified: boolean;
  kvBudget: number;
  kvPaged: boolean;
  /** Paged: cells per block of the pool (1: cell by cell). */
  kvBlockSize: number;
  /** Bytes of host memory preempted sequences' KV may take (0: recomputed instead). */
  kvSwapMemory: number;
  /** KV cache element types by ggml name ('f16', 'q8_0', ...). */
  kvCacheTypeK: string;
  kvCacheTypeV: string;
  fusedMoeRouting: boolean;
  deterministic: boolean;
  promptCache: boolean;
  stateCheckpoints: number;
  /** Bytes all state copies may hold together. */
  stateCheckpointMemory: number;
  flashAttention: number;
  useMmap: boolean;
  maxQueue: number;
  cpuMoeLayers: number;
  expertStats: boolean;
  /** Expert placement: copies per MoE layer on its device, the counts to choose them by, re-choice interval. */
  gpuExperts: number;
  expertHeat?: Array<{ layer: number; counts: number[] }>;
  expertReplaceTokens: number;
  /** Speculative decoding: the draft model's native object, and tokens drafted per step. */
  draft?: NativeModel;
  draftMaxTokens?: number;
  /** Draft with the model's own MTP (nextn) layers (loaded with them). */
  draftMtp?: boolean;
  /** llama_split_mode: 0 none, 1 layer, 2 row, 3 tensor. */
  splitMode: number;
  tensorSplit: number[];
  mainGpu: number;
  rpcServers: string[];
}

export interface NativeDeviceMemory {
  name: string;
  description: string;
  kind: DeviceKind;
  host: boolean;
  /** Repeating layers whose weights this device holds. */
  layers: number[];
  /** Holds the output layer. */
  output: boolean;
  model: number;
  context: number;
  compute: number;
  free: number;
  total: number;
}

/** 'rpc': a device lent by a `genesis rpc-server`; 'meta': llama.cpp's tensor-parallel device over several. */
export type DeviceKind = 'cpu' | 'gpu' | 'igpu' | 'rpc' | 'meta' | 'accel';

export interface NativePlacement {
  splitMode: 'none' | 'layer' | 'row' | 'tensor';
  mainGpu: number;
  tensorSplit: number[];
  rpcServers: string[];
  /** Host first, then the offload devices in split order, with bytes measured after the load. */
  devices: NativeDeviceMemory[];
}

export interface NativeMemoryEstimate {
  devices: NativeDeviceMemory[];
  contextCells: number;
  layers: number;
  experts: number;
  parameters: number;
}

export interface NativeSubmitOptions {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  penaltyLastN: number;
  repeatPenalty: number;
  frequencyPenalty: number;
  presencePenalty: number;
  logitBias: Array<[number, number]>;
  seed: number;
  maxTokens: number;
  stop: string[];
  priority: number;
  ignoreEos: boolean;
  grammar: string;
  /** Tokens to draft per step: -1 the model's default, 0 none. */
  draftMaxTokens: number;
  /** Logit fusion: send each step's logits ('logits' event) and wait for feed(id, token). */
  externalSampling?: boolean;
}

export interface NativeTimings {
  queuedMs: number;
  promptMs: number;
  generationMs: number;
  timeToFirstTokenMs: number;
}

export type NativeEvent =
  | { id: number; kind: 'tokens'; tokens: Int32Array; text: string }
  | {
      id: number;
      kind: 'done';
      tokens: Int32Array;
      text: string;
      finishReason: 'eog' | 'stop' | 'length' | 'context' | 'abort';
      promptTokens: number;
      completionTokens: number;
      draftTokens: number;
      draftAccepted: number;
      preemptions: number;
      timings: NativeTimings;
    }
  | { id: number; kind: 'error'; tokens: Int32Array; text: string; code: string; message: string; completionTokens: number }
  | { id: number; kind: 'logits'; logits: Float32Array };

export interface NativeModelInfo {
  architecture: string;
  name: string;
  description: string;
  parameters: number;
  sizeBytes: number;
  fileType: string;
  embeddingLength: number;
  layers: number;
  heads: number;
  kvHeads: number;
  trainContextLength: number;
  vocabSize: number;
  experts: number;
  expertsUsed: number;
  recurrent: boolean;
  hybrid: boolean;
  chatTemplate: string | null;
  specialTokens: { bos: number; eos: number; eot: number; addBos: boolean };
  context: { contextSize: number; maxSequences: number; batchSize: number; totalContext: number; maxQueue: number; expertStats: boolean; kvPaged: boolean; kvBlockSize: number; kvCacheType: { k: string; v: string }; fusedMoeRouting: boolean; expertPlacement: boolean };
  metadata: Record<string, string>;
  /** What sits where: the split as loaded and, per device, its bytes and layers. */
  placement: NativePlacement;
}

export interface NativeExpertPlacement {
  layer: number;
  experts: Int32Array;
  bytes: number;
  routed: number;
  routedToCopies: number;
}

export interface NativeModel {
  info(): NativeModelInfo;
  tokenize(text: string, addSpecial: boolean, parseSpecial: boolean): Int32Array;
  tokenizeAsync(text: string, addSpecial: boolean, parseSpecial: boolean): Promise<Int32Array>;
  detokenize(tokens: Int32Array | number[], removeSpecial: boolean, unparseSpecial: boolean): string;
  applyChatTemplate(messages: Array<{ role: string; content: string }>, addAssistant: boolean, template?: string): string;
  submit(id: number, prompt: Int32Array, options: NativeSubmitOptions): void;
  feed(id: number, token: number): void;
  /** '<n_tokens>:<hex digest of the tokenizer>': equal for models whose token ids mean the same text. */
  vocabDigest(): string;
  cancel(id: number): void;
  stats(): EngineStats;
  /** The expert counters of every MoE layer (models loaded with expertStats), zeroed after the read with reset. */
  expertStats(reset: boolean): Promise<Array<{ layer: number; counts: Float64Array }>>;
  /** Expert placement (models loaded with gpuExperts), read between two steps: the copies per layer, and why periodic re-choice stopped. */
  expertPlacement(): Promise<{ layers: NativeExpertPlacement[]; error?: string }>;
  /** Chooses the copied experts again between two steps, from `heat` added to the engine's own counts. */
  placeExperts(heat?: Array<{ layer: number; counts: number[] }>): Promise<{ layers: NativeExpertPlacement[]; error?: string }>;
  embed(inputs: Int32Array[]): Promise<{ embeddings: Float32Array[]; pooling: string }>;
  close(onEvents: (events: NativeEvent[]) => void): Promise<void>;
}

export interface NativeSystemInfo {
  llamaCpp: string;
  gpuOffload: boolean;
  mmap: boolean;
  maxSequences: number;
  variant: 'cpu' | 'cuda';
  /** llama.cpp's RPC backend is built in (rpcServers, genesis rpc-server). */
  rpc: boolean;
  /** Most devices one model may be split over (llama_max_devices). */
  maxDevices: number;
}

export interface NativeRpcServer {
  endpoint: string;
  devices: Array<{ name: string; description: string; free: number; total: number }>;
  /** Rejects (code RPC_SERVER) when the server ends: it could not listen. Never resolves. */
  stopped: Promise<never>;
}

export interface NativeMoeRoute {
  ids: Int32Array;
  weights: Float32Array;
  device: string;
  secondsPerCall: number;
  secondsPerCallPipelined: number;
  counts?: Uint32Array;
}

export interface NativeBinding {
  loadModel(
    path: string,
    options: NativeLoadOptions,
    onProgress: ((progress: number) => void) | undefined,
    onEvents: (events: NativeEvent[]) => void,
  ): Promise<NativeModel>;
  systemInfo(): NativeSystemInfo;
  /** Opens (true) or closes (false) a CUDA profiler range; false on the CPU build or a CUDA error. */
  cudaProfiler(on: boolean): boolean;
  /** MoE routing three ways (src/moe.ts); throws `{ code, message, option?, expected? }`. */
  moeRoute(kind: string, logits: Float32Array, nTokens: number, params: object, options?: object): NativeMoeRoute;
  /** Runs on the libuv pool; rejects with `{ code, message, option?, expected? }`. */
  measureBandwidth(options: BandwidthOptions): Promise<BandwidthResult>;
  estimateMemory(path: string, options: NativeLoadOptions): Promise<NativeMemoryEstimate>;
  startRpcServer(options: { host: string; port: number; threads: number; devices?: string[]; cacheDir?: string }): NativeRpcServer;
}

/** Root of the installed package (holds binding.gyp, build/ and prebuilds/). */
export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

let cached: NativeBinding | undefined;
let chosen: BinaryChoice | undefined;

/** Which native binary this process loaded, and why. */
export interface BinaryChoice {
  variant: 'cpu' | 'cuda';
  file: string;
  /** In words: where it came from, and for a CPU prebuild why the CUDA one was not used. */
  reason: string;
}

/**
 * The binary to load, in order: GENESIS_BINARY (a path); a source build (build/Release, made by
 * `npm install`); else the prebuilds for this platform (prebuilds/<platform>-<arch>/
 * genesis-runtime.napi.<variant>.node): the CUDA one when a child process can load it and it finds
 * a GPU (a missing or broken driver then crashes or fails the child, never this process), else the
 * CPU one. GENESIS_VARIANT=cpu skips the CUDA probe.
 */
export function chooseBinary(root = packageRoot, env: NodeJS.ProcessEnv = process.env): BinaryChoice {
  const variantOf = (file: string): 'cpu' | 'cuda' => (/\.cuda\.node$/.test(file) ? 'cuda' : 'cpu');
  if (env.GENESIS_BINARY) return { variant: variantOf(env.GENESIS_BINARY), file: env.GENESIS_BINARY, reason: 'GENESIS_BINARY names it' };
  const built = join(root, 'build', 'Release', 'genesis.node');
  if (existsSync(built)) return { variant: 'cpu', file: built, reason: 'built from source by npm install (build/Release)' };
  const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  const prebuild = (variant: string) => join(dir, `genesis-runtime.napi.${variant}.node`);
  const cpu = prebuild('cpu');
  const cuda = prebuild('cuda');
  if (!existsSync(cuda)) {
    if (existsSync(cpu)) return { variant: 'cpu', file: cpu, reason: 'CPU prebuild (no CUDA prebuild for this platform)' };
    throw new GenesisError('NATIVE_BINDING', `no native binary: neither ${built} nor a prebuild in ${dir}`);
  }
  if (env.GENESIS_VARIANT === 'cpu') {
    if (existsSync(cpu)) return { variant: 'cpu', file: cpu, reason: 'CPU prebuild: GENESIS_VARIANT=cpu' };
  } else {
    const probe = probeCuda(cuda);
    if (probe.ok) return { variant: 'cuda', file: cuda, reason: `CUDA prebuild: ${probe.detail}` };
    if (existsSync(cpu)) return { variant: 'cpu', file: cpu, reason: `CPU prebuild: the CUDA one ${probe.detail}` };
    throw new GenesisError('NATIVE_BINDING', `the CUDA prebuild ${probe.detail}, and there is no CPU prebuild in ${dir}`);
  }
  throw new GenesisError('NATIVE_BINDING', `GENESIS_VARIANT=cpu, but there is no CPU prebuild in ${dir}`);
}

/**
 * Loads `file` in a child process and asks it for its devices. A driver that is missing, too old,
 * or crashes takes down the child only.
 */
function probeCuda(file: string): { ok: boolean; detail: string } {
  const script = 'const b = require(process.argv[1]); process.stdout.write(JSON.stringify({ gpu: b.systemInfo().gpuOffload }))';
  const r = spawnSync(process.execPath, ['-e', script, file], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, GENESIS_LOG: '' } });
  if (r.error) return { ok: false, detail: `could not be probed (${r.error.message})` };
  if (r.signal) return { ok: false, detail: `crashed the probe process (${r.signal}): a broken or missing driver?` };
  if (r.status !== 0) {
    const why = (r.stderr || '').trim().split('\n').filter((l) => /Error|error/.test(l))[0] ?? `exit status ${r.status}`;
    return { ok: false, detail: `did not load (${why.trim().slice(0, 300)})` };
  }
  try {
    const info = JSON.parse(r.stdout) as { gpu: boolean };
    return info.gpu ? { ok: true, detail: 'a child process loaded it and found a GPU' } : { ok: false, detail: 'loaded but found no GPU' };
  } catch {
    return { ok: false, detail: `gave an unreadable answer (${r.stdout.slice(0, 100)})` };
  }
}

export function binding(): NativeBinding {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  let choice: BinaryChoice | undefined;
  try {
    choice = chooseBinary();
    cached = require(choice.file) as NativeBinding;
    chosen = { ...choice, variant: cached.systemInfo().variant };
    return cached;
  } catch (error) {
    if (error instanceof GenesisError && !choice) throw error;
    throw new GenesisError(
      'NATIVE_BINDING',
      `the Genesis native addon could not be loaded for ${process.platform}-${process.arch} (Node ${process.version})` +
        `${choice ? ` from ${choice.file}` : ''}: ${error instanceof Error ? error.message : String(error)}. Fixes: run \`npm install\` in ${packageRoot} ` +
        '(it builds llama.cpp and the addon; needs cmake, git, make and a C++17 compiler), or `npm run build` to rebuild after a Node upgrade.',
      { cause: error },
    );
  }
}

/** The binary this process loaded and why (loads it if needed). */
export function loadedBinary(): BinaryChoice {
  binding();
  return chosen!;
}
