/**
 * The native addon's surface, typed in one place, and the loader that finds the binary.
 * Nothing outside src/ touches these types: the public API wraps them.
 */
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
  deterministic: boolean;
  promptCache: boolean;
  flashAttention: number;
  useMmap: boolean;
  maxQueue: number;
  cpuMoeLayers: number;
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
      timings: NativeTimings;
    }
  | { id: number; kind: 'error'; tokens: Int32Array; text: string; code: string; message: string; completionTokens: number };

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
  context: { contextSize: number; maxSequences: number; batchSize: number; totalContext: number; maxQueue: number };
  metadata: Record<string, string>;
  /** What sits where: the split as loaded and, per device, its bytes and layers. */
  placement: NativePlacement;
}

export interface NativeModel {
  info(): NativeModelInfo;
  tokenize(text: string, addSpecial: boolean, parseSpecial: boolean): Int32Array;
  tokenizeAsync(text: string, addSpecial: boolean, parseSpecial: boolean): Promise<Int32Array>;
  detokenize(tokens: Int32Array | number[], removeSpecial: boolean, unparseSpecial: boolean): string;
  applyChatTemplate(messages: Array<{ role: string; content: string }>, addAssistant: boolean, template?: string): string;
  submit(id: number, prompt: Int32Array, options: NativeSubmitOptions): void;
  cancel(id: number): void;
  stats(): EngineStats;
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

export interface NativeBinding {
  loadModel(
    path: string,
    options: NativeLoadOptions,
    onProgress: ((progress: number) => void) | undefined,
    onEvents: (events: NativeEvent[]) => void,
  ): Promise<NativeModel>;
  systemInfo(): NativeSystemInfo;
  /** Runs on the libuv pool; rejects with `{ code, message, option?, expected? }`. */
  measureBandwidth(options: BandwidthOptions): Promise<BandwidthResult>;
  estimateMemory(path: string, options: NativeLoadOptions): Promise<NativeMemoryEstimate>;
  startRpcServer(options: { host: string; port: number; threads: number; devices?: string[]; cacheDir?: string }): NativeRpcServer;
}

/** Root of the installed package (holds binding.gyp, build/ and prebuilds/). */
export const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

let cached: NativeBinding | undefined;

export function binding(): NativeBinding {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  try {
    // node-gyp-build looks in prebuilds/<platform>-<arch> first, then build/Release.
    const load = require('node-gyp-build') as (dir: string) => NativeBinding;
    cached = load(packageRoot);
    return cached;
  } catch (error) {
    throw new GenesisError(
      'NATIVE_BINDING',
      `the Genesis native addon could not be loaded for ${process.platform}-${process.arch} (Node ${process.version}): ` +
        `${error instanceof Error ? error.message : String(error)}. Fixes: run \`npm install\` in ${packageRoot} ` +
        '(it builds llama.cpp and the addon; needs cmake, git, make and a C++17 compiler), or `npm run build` to rebuild after a Node upgrade.',
      { cause: error },
    );
  }
}
