/**
 * Memory planning before allocation. llama.cpp loads the model's metadata with no_alloc and builds
 * the engine's context with its allocations simulated, then reports per buffer type what the
 * weights, the KV cache and the compute buffers would take; nothing is read or allocated.
 * planMemory() searches the options (context size, GPU layers, MoE experts kept in host memory)
 * for the fastest arrangement that fits a budget, and says why in words and numbers.
 */
import { freemem } from 'node:os';

import { binding, type DeviceKind, type NativeDeviceMemory, type NativeLoadOptions, type NativeMemoryEstimate } from './binding.js';
import { InvalidOptionError, MemoryBudgetError, toGenesisError } from './errors.js';
import { resolveModelLoad } from './model.js';
import type { LoadModelOptions } from './options.js';

export interface DeviceMemoryEstimate {
  /** 'CPU' for host memory, else ggml's device name ('CUDA0', 'RPC0'). */
  device: string;
  /** For an RPC device, the server's host:port. */
  description: string;
  kind: DeviceKind;
  host: boolean;
  /** Repeating layers whose weights sit here. */
  layers: number[];
  /** Holds the output layer. */
  output: boolean;
  /** Bytes of weights on this device. */
  weights: number;
  /** Bytes of KV cache. */
  kvCache: number;
  /** Bytes of compute buffers. */
  compute: number;
  /** weights + kvCache + compute. */
  total: number;
  /** What the device reports free now, and its size (0 when it does not say). */
  free: number;
  capacity: number;
}

export interface MemoryEstimate {
  path: string;
  /** Per device, host first; devices that get nothing are listed with zeros. */
  devices: DeviceMemoryEstimate[];
  /** Sum over devices. */
  total: number;
  /** KV cache bytes per context token (all devices), for sizing the context. */
  kvBytesPerToken: number;
  /** Context cells of the engine: contextSize × maxSequences. */
  contextCells: number;
  layers: number;
  /** Experts per MoE layer; 0 for a dense model. */
  experts: number;
  parameters: number;
  /** The load options this estimate is for, as resolved (contextSize, gpuLayers, ...). */
  options: NativeLoadOptions;
}

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

export function formatBytes(bytes: number): string {
  return bytes >= GiB ? `${(bytes / GiB).toFixed(2)} GiB` : `${(bytes / MiB).toFixed(1)} MiB`;
}

/** A native per-device record in the public shape (estimates and model.info.placement). */
export function toDeviceMemory(d: NativeDeviceMemory): DeviceMemoryEstimate {
  return {
    device: d.name,
    description: d.description,
    kind: d.kind,
    host: d.host,
    layers: d.layers,
    output: d.output,
    weights: d.model,
    kvCache: d.context,
    compute: d.compute,
    total: d.model + d.context + d.compute,
    free: d.free,
    capacity: d.total,
  };
}

function toEstimate(path: string, options: NativeLoadOptions, n: NativeMemoryEstimate): MemoryEstimate {
  const devices = n.devices.map(toDeviceMemory);
  const kv = devices.reduce((a, d) => a + d.kvCache, 0);
  return {
    path,
    devices,
    total: devices.reduce((a, d) => a + d.total, 0),
    kvBytesPerToken: n.contextCells > 0 ? kv / n.contextCells : 0,
    contextCells: n.contextCells,
    layers: n.layers,
    experts: n.experts,
    parameters: n.parameters,
    options,
  };
}

async function estimateResolved(path: string, options: NativeLoadOptions): Promise<MemoryEstimate> {
  try {
    return toEstimate(path, options, await binding().estimateMemory(path, options));
  } catch (error) {
    throw toGenesisError(error as { code: string; message: string; path?: string });
  }
}

/**
 * What loadModel(path, options) would take on each device (weights, KV cache, compute buffers),
 * without loading the weights. The embeddings context embed() creates on first use is not counted.
 */
export async function estimateMemory(path: string, options: LoadModelOptions = {}): Promise<MemoryEstimate> {
  return estimateResolved(path, await resolveModelLoad(path, options));
}

export interface MemoryBudget {
  /** Host RAM the model may use, in bytes. Default: free RAM now minus `reserve`. */
  host?: number;
  /** Memory each GPU may give the model, in bytes. Default: the GPU's free memory minus `reserve`. */
  gpu?: number;
  /**
   * Per device, by ggml device name ('CUDA0', 'RPC1') or, for an RPC device, its server's
   * 'host:port': overrides `gpu` for that device. With several offload devices and no
   * tensorSplit, the layers are then split in proportion to these budgets.
   */
  devices?: Record<string, number>;
  /** Left free when a default comes from free memory. Default 1 GiB. */
  reserve?: number;
}

export interface MemoryPlan {
  /** The load options chosen (pass to loadModel, or loadModel does with `memoryBudget`). */
  options: { contextSize: number; gpuLayers: number | 'max'; cpuMoeLayers: number; gpuExperts?: number; tensorSplit?: number[] };
  estimate: MemoryEstimate;
  /** The budget per device it was fitted to, in bytes. */
  budget: Record<string, number>;
  /** Why: one sentence per decision, with the numbers. */
  explanation: string[];
}

export type PlanOptions = LoadModelOptions;

/**
 * Bytes per device from a budget spec, for the devices of an estimate (validated). `strict`: a
 * per-device entry must name one of `devices` (one model's budget); a runtime's budget covers many
 * models, each with some of the devices, and passes false.
 */
export function resolveBudget(
  devices: ReadonlyArray<Pick<DeviceMemoryEstimate, 'device' | 'description' | 'host' | 'free'>>,
  budget: MemoryBudget | number | undefined,
  strict = true,
): Map<string, number> {
  if (typeof budget === 'number' && !(Number.isFinite(budget) && budget >= 0)) {
    throw new InvalidOptionError('memoryBudget', 'bytes ≥ 0, or { host?, gpu?, reserve? } in bytes', budget);
  }
  const b: MemoryBudget = typeof budget === 'number' ? { host: budget } : (budget ?? {});
  if (b === null || typeof b !== 'object') throw new InvalidOptionError('memoryBudget', 'bytes, or { host?, gpu?, reserve? } in bytes', budget);
  for (const k of ['host', 'gpu', 'reserve'] as const) {
    const v = b[k];
    if (v !== undefined && (typeof v !== 'number' || !Number.isFinite(v) || v < 0)) {
      throw new InvalidOptionError(`memoryBudget.${k}`, 'a number of bytes ≥ 0', v);
    }
  }
  const perDevice = b.devices ?? {};
  if (perDevice === null || typeof perDevice !== 'object' || Array.isArray(perDevice)) {
    throw new InvalidOptionError('memoryBudget.devices', "{ [device name or RPC 'host:port']: bytes }", b.devices);
  }
  const offload = devices.filter((d) => !d.host);
  for (const [key, v] of Object.entries(perDevice)) {
    if (strict && !offload.some((d) => d.device === key || d.description === key)) {
      const names = offload.map((d) => (d.description && d.description !== d.device ? `${d.device} (${d.description})` : d.device));
      throw new InvalidOptionError(`memoryBudget.devices.${key}`, `one of this model's offload devices: ${names.join(', ') || 'none'}`, key);
    }
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new InvalidOptionError(`memoryBudget.devices.${key}`, 'a number of bytes ≥ 0', v);
  }
  const reserve = b.reserve ?? GiB;
  const out = new Map<string, number>();
  for (const d of devices) {
    const fallback = Math.max(0, (d.host ? freemem() : d.free) - reserve);
    const own = perDevice[d.device] ?? perDevice[d.description];
    out.set(d.device, d.host ? (b.host ?? fallback) : (own ?? b.gpu ?? fallback));
  }
  return out;
}

/**
 * An estimate with every layer's experts in host memory plus `count` copies per layer of its experts
 * on the offload devices (gpuExperts): each device's weights grow by that share of the experts it
 * holds when they are all offloaded (`offloaded`).
 */
function withCopies(hosted: MemoryEstimate, count: number, experts: number, offloaded: MemoryEstimate): MemoryEstimate {
  if (experts <= 0) return hosted;
  const devices = hosted.devices.map((d) => {
    if (d.host) return d;
    const all = offloaded.devices.find((x) => x.device === d.device)?.weights ?? d.weights;
    const copies = Math.round((Math.max(0, all - d.weights) * count) / experts);
    return { ...d, weights: d.weights + copies, total: d.total + copies };
  });
  return { ...hosted, devices };
}

/** The first device whose estimate is over its budget, with by how much. */
function shortfall(estimate: MemoryEstimate, budget: Record<string, number>): { device: string; needed: number; budget: number } | undefined {
  for (const d of estimate.devices) {
    const b = budget[d.device] ?? 0;
    if (d.total > b) return { device: d.device, needed: d.total, budget: b };
  }
  return undefined;
}

function describeEstimate(e: MemoryEstimate, budget: Record<string, number>): string {
  return e.devices
    .filter((d) => d.total > 0)
    .map(
      (d) =>
        `${d.device}: ${formatBytes(d.total)} of ${formatBytes(budget[d.device] ?? 0)} ` +
        `(weights ${formatBytes(d.weights)}, KV cache ${formatBytes(d.kvCache)}, compute ${formatBytes(d.compute)})`,
    )
    .join('; ');
}

/**
 * The fastest arrangement that fits `memoryBudget`: all layers on the GPU when the build has one;
 * for MoE models, then the experts of the fewest layers kept in host memory; then fewer GPU layers;
 * the requested context first, halved down to minContextSize only when nothing else fits.
 * Throws MemoryBudgetError naming the device and the shortfall when even that does not fit.
 */
export async function planMemory(path: string, options: PlanOptions = {}): Promise<MemoryPlan> {
  let base = await resolveModelLoad(path, options);
  let first = await estimateResolved(path, base);
  const budget = Object.fromEntries(resolveBudget(first.devices, options.memoryBudget));
  const offloadDevices = first.devices.filter((d) => !d.host);
  const perDevice = typeof options.memoryBudget === 'object' && options.memoryBudget.devices !== undefined;
  if (perDevice && offloadDevices.length > 1 && base.tensorSplit.length === 0 && base.splitMode !== 0 && base.splitMode !== 3) {
    // Per-device budgets and no proportions given: split the layers as the budgets are.
    const split = offloadDevices.map((d) => budget[d.device] ?? 0);
    const sum = split.reduce((a, x) => a + x, 0);
    if (sum > 0) {
      base = { ...base, tensorSplit: split.map((x) => Math.round((x / sum) * 1000) / 1000) };
      first = await estimateResolved(path, base);
    }
  }
  const moePlacement = options.moePlacement ?? 'layers';
  if (moePlacement !== 'layers' && moePlacement !== 'experts') throw new InvalidOptionError('moePlacement', "'layers' or 'experts'", options.moePlacement);
  const minContext = Math.min(base.contextSize, options.minContextSize ?? 512);
  if (!Number.isInteger(minContext) || minContext < 2) throw new InvalidOptionError('minContextSize', 'an integer ≥ 2', options.minContextSize);
  const gpu = (binding().systemInfo().gpuOffload || base.rpcServers.length > 0) && base.gpuLayers !== 0;
  // Where offloaded layers go: "the GPU", or the devices by name when there are several or remote ones.
  const target =
    offloadDevices.length === 1 && offloadDevices[0]!.kind === 'gpu'
      ? 'the GPU'
      : `the offload devices (${offloadDevices.map((d) => (d.kind === 'rpc' ? `${d.device} at ${d.description}` : d.device)).join(', ')})`;
  const layers = first.layers;
  const explanation: string[] = [];
  const cache = new Map<string, MemoryEstimate>([[JSON.stringify([base.contextSize, base.gpuLayers, base.cpuMoeLayers]), first]]);
  const estimate = async (contextSize: number, gpuLayers: number, cpuMoeLayers: number) => {
    const key = JSON.stringify([contextSize, gpuLayers, cpuMoeLayers]);
    let e = cache.get(key);
    if (!e) {
      e = await estimateResolved(path, { ...base, contextSize, gpuLayers, cpuMoeLayers });
      cache.set(key, e);
    }
    return e;
  };
  /** Smallest n in [lo, hi] with ok(n), assuming ok is monotone; undefined when none. */
  const smallest = async (lo: number, hi: number, ok: (n: number) => Promise<boolean>) => {
    if (!(await ok(hi))) return undefined;
    while (lo < hi) {
      const mid = Math.floor((lo + hi) / 2);
      if (await ok(mid)) hi = mid;
      else lo = mid + 1;
    }
    return hi;
  };

  /**
   * moePlacement 'experts': every layer's experts in host memory, and the most copies per layer of
   * its hottest that fit beside the rest on every offload device (undefined when that is not one).
   * An expert's copies in all layers weigh what its share of the experts weighs on the device
   * (all experts offloaded minus none); 5 % of the room is left for the extra graph's buffers.
   */
  const expertCopies = async (contextSize: number, moe: number): Promise<{ count: number; bytes: number } | undefined> => {
    const hosted = await estimate(contextSize, -1, layers);
    const offloaded = await estimate(contextSize, -1, 0);
    let count = first.experts - 1;
    let perExpert = 0;
    for (const d of hosted.devices.filter((x) => !x.host)) {
      const experts = (offloaded.devices.find((x) => x.device === d.device)?.weights ?? d.weights) - d.weights;
      if (experts <= 0) continue;
      const room = ((budget[d.device] ?? 0) - d.total) * 0.95;
      count = Math.min(count, Math.floor(room / (experts / first.experts)));
      perExpert += experts / first.experts;
    }
    // Only worth it where it keeps at least as much on the device as --n-cpu-moe's choice would.
    const layerShare = Math.floor((first.experts * (layers - moe)) / layers);
    if (perExpert === 0 || count < 1 || count < layerShare) return undefined;
    return { count, bytes: count * perExpert };
  };

  const contexts: number[] = [];
  for (let c = base.contextSize; c > minContext; c = Math.floor(c / 2)) contexts.push(c);
  contexts.push(minContext);

  let last: MemoryEstimate = first;
  for (const contextSize of contexts) {
    const fits = async (gl: number, moe: number) => {
      last = await estimate(contextSize, gl, moe);
      return shortfall(last, budget) === undefined;
    };
    let choice: { gpuLayers: number; cpuMoeLayers: number; gpuExperts?: number; why: string } | undefined;
    if (!gpu) {
      if (await fits(base.gpuLayers, 0)) choice = { gpuLayers: base.gpuLayers, cpuMoeLayers: 0, why: 'all weights in host memory (no GPU offload)' };
    } else if (await fits(base.gpuLayers, base.cpuMoeLayers)) {
      choice = { gpuLayers: base.gpuLayers, cpuMoeLayers: base.cpuMoeLayers, why: `as asked: ${base.gpuLayers < 0 ? 'all' : base.gpuLayers} layers on ${target}` };
    } else {
      const moe = first.experts > 0 ? await smallest(1, layers, (k) => fits(-1, k)) : undefined;
      const copies = moe !== undefined && moePlacement === 'experts' ? await expertCopies(contextSize, moe) : undefined;
      if (copies !== undefined) {
        choice = {
          gpuLayers: -1,
          cpuMoeLayers: layers,
          gpuExperts: copies.count,
          why:
            `all ${layers} layers on ${target} with every layer's experts kept in host memory and copies of its ${copies.count} hottest of ${first.experts} ` +
            `on ${target} (${formatBytes(copies.bytes)} in all), where --n-cpu-moe ${moe} would keep the experts of the first ${moe} layers off it`,
        };
      } else if (moe !== undefined) {
        choice = { gpuLayers: -1, cpuMoeLayers: moe, why: `all ${layers} layers on ${target} with the experts of the first ${moe} kept in host memory (attention and shared weights stay offloaded; decode reads only the routed experts)` };
      } else {
        // Most layers on the GPU: the largest g that fits, i.e. the smallest number left on the CPU.
        const onCpu = await smallest(1, layers, (k) => fits(layers - k, 0));
        if (onCpu !== undefined) choice = { gpuLayers: layers - onCpu, cpuMoeLayers: 0, why: `${layers - onCpu} of ${layers} layers on ${target}, ${onCpu} on the CPU` };
      }
    }
    if (choice) {
      const placed = await estimate(contextSize, choice.gpuLayers, choice.cpuMoeLayers);
      const chosen =
        choice.gpuExperts !== undefined ? withCopies(placed, choice.gpuExperts, first.experts, await estimate(contextSize, choice.gpuLayers, 0)) : placed;
      if (contextSize < base.contextSize) {
        explanation.push(`contextSize ${contextSize} instead of the ${base.contextSize} asked for: ${base.contextSize} did not fit with any placement of the weights`);
      } else {
        explanation.push(`contextSize ${contextSize} × ${base.maxSequences} sequences as asked (KV cache ${formatBytes(chosen.kvBytesPerToken)} per token)`);
      }
      explanation.push(choice.why);
      explanation.push(describeEstimate(chosen, budget));
      // Native -1 means every layer; loadModel spells that 'max'.
      const gpuLayers = choice.gpuLayers < 0 ? ('max' as const) : choice.gpuLayers;
      if (base.tensorSplit.length > 0 && offloadDevices.length > 1 && choice.gpuLayers !== 0) {
        explanation.push(`layers split over ${offloadDevices.map((d) => d.device).join(', ')} in proportions ${base.tensorSplit.map((x) => +x.toPrecision(3)).join(':')}`);
      }
      return {
        options: {
          contextSize,
          gpuLayers,
          cpuMoeLayers: choice.cpuMoeLayers,
          ...(choice.gpuExperts !== undefined ? { gpuExperts: choice.gpuExperts } : {}),
          ...(base.tensorSplit.length > 0 ? { tensorSplit: base.tensorSplit } : {}),
        },
        estimate: chosen,
        budget,
        explanation,
      };
    }
  }
  const short = shortfall(last, budget)!;
  throw new MemoryBudgetError(
    short.device,
    short.needed,
    short.budget,
    `${path} does not fit the memory budget: even at contextSize ${minContext} it needs ${formatBytes(short.needed)} on ${short.device}, ` +
      `over the ${formatBytes(short.budget)} budget by ${formatBytes(short.needed - short.budget)} (${describeEstimate(last, budget)})`,
  );
}
