import { binding, loadedBinary, type BinaryChoice, type NativeSystemInfo } from './binding.js';
import { GenesisError, InvalidOptionError, toGenesisError, type NativeFailure } from './errors.js';

/** What the loaded native binary supports: variant (cpu/cuda), GPU offload, llama.cpp's CPU features. */
export function systemInfo(): NativeSystemInfo & { binary: BinaryChoice } {
  return { ...binding().systemInfo(), binary: loadedBinary() };
}

/**
 * Opens (`true`) or closes (`false`) the range a CUDA profiler records when started with
 * `ncu --profile-from-start off` (benchmarks/gpu-profile.mjs uses it to profile decode steps only).
 * Returns whether it was done: false on the CPU build or when CUDA refuses.
 */
export function cudaProfilerRange(on: boolean): boolean {
  return binding().cudaProfiler(on);
}

export interface BandwidthOptions {
  /** Which ggml device to measure: 'cpu' (default) or 'gpu'. */
  device?: 'cpu' | 'gpu';
  /** With device 'gpu': which GPU, counted among GPU devices only. Default 0. */
  gpuIndex?: number;
  /**
   * Size of each of the two tensors, in bytes: 1 MiB to 4 GiB, rounded down to whole F32 values.
   * Default 256 MiB on the CPU, 1 GiB on a GPU. Use a size well above the last-level cache,
   * or the figure is cache bandwidth, not memory bandwidth.
   */
  bytes?: number;
  /** Timed copies, 1 to 1000. Default 10. */
  iterations?: number;
  /** Untimed copies first, 0 to 1000. Default 2. */
  warmup?: number;
  /** CPU device only (ignored for a GPU): threads doing the copy, 1 to 1024. Default: all cores. */
  threads?: number;
}

export interface BandwidthResult {
  /** ggml's device name, e.g. "CPU" or "CUDA0". */
  device: string;
  /** ggml's description of it, e.g. the CPU model or the GPU name. */
  description: string;
  /** Size of each tensor (the copy reads this many bytes and writes as many). */
  bytes: number;
  /** Timed copies. */
  iterations: number;
  /** 2 × bytes over the fastest copy, in bytes per second. */
  bestBytesPerSecond: number;
  /** 2 × bytes × iterations over their total time, in bytes per second. */
  meanBytesPerSecond: number;
}

// The same limits as native/engine/bandwidth.h, checked here to report the value received.
const MIB = 1024 * 1024;
const MAX_BYTES = 4 * 1024 * MIB;

function checkInt(name: string, value: unknown, min: number, max: number, expected?: string): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidOptionError(name, expected ?? `an integer in [${min}, ${max}]`, value);
  }
}

/**
 * Measures memory bandwidth on one device, for the benchmark harness's roofline: it times a
 * streaming F32 copy of `bytes` (ggml_cpy, through ggml's backend API on the chosen device) and
 * counts every byte read and written. Runs off the JS thread; a measurement takes about
 * (warmup + iterations) × 2 × bytes / bandwidth. Probes in one process run one at a time.
 *
 * Rejects with InvalidOptionError naming the option for a bad value, and for device 'gpu' when
 * ggml has no GPU device (the CPU build, or no usable GPU); GenesisError 'ENGINE' if ggml fails.
 * The figure depends on what else runs: measure when the machine is otherwise idle.
 */
export async function measureBandwidth(options: BandwidthOptions = {}): Promise<BandwidthResult> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options', 'an object', options);
  const { device, gpuIndex, bytes, iterations, warmup, threads } = options;
  if (device !== undefined && device !== 'cpu' && device !== 'gpu') throw new InvalidOptionError('device', "'cpu' or 'gpu'", device);
  if (gpuIndex !== undefined && device !== 'gpu') {
    throw new InvalidOptionError('gpuIndex', "undefined unless device is 'gpu' (gpuIndex picks among GPU devices)", gpuIndex);
  }
  checkInt('gpuIndex', gpuIndex, 0, 1023);
  checkInt('bytes', bytes, MIB, MAX_BYTES, `an integer number of bytes in [${MIB}, ${MAX_BYTES}] (1 MiB to 4 GiB)`);
  checkInt('iterations', iterations, 1, 1000);
  checkInt('warmup', warmup, 0, 1000);
  checkInt('threads', threads, 1, 1024);
  try {
    return await binding().measureBandwidth({ device, gpuIndex, bytes, iterations, warmup, threads });
  } catch (error) {
    if (error instanceof GenesisError) throw error;
    throw toGenesisError(error as NativeFailure);
  }
}
