/**
 * Several models under one memory budget. Each model is registered by name; it is loaded on first
 * use (or by load()), and when a load needs room the least recently used idle models are unloaded
 * first. A model in use is never unloaded: the load waits for one to become idle. The next request
 * to an unloaded model reloads it transparently. Memory is accounted per device from
 * estimateMemory(), before anything is allocated.
 *
 *   const runtime = createRuntime({ memoryBudget: 8 * 1024 ** 3 });
 *   runtime.register('router', 'router.gguf', { contextSize: 2048 });
 *   runtime.register('big', 'moe.gguf', { keepAlive: 10 * 60_000 });
 *   const r = await runtime.complete('router', 'Classify: ...', { maxTokens: 8 });
 */
import { DisposedError, InvalidOptionError, MemoryBudgetError } from './errors.js';
import { fuse } from './fusion.js';
import type { Generation, GenerationResult } from './generation.js';
import { estimateMemory, formatBytes, resolveBudget, type MemoryBudget, type MemoryEstimate } from './memory.js';
import { loadModel, type ChatMessage, type EmbeddingResult, type Model } from './model.js';
import type { ChatOptions, GenerateOptions, LoadModelOptions } from './options.js';

export interface RuntimeOptions {
  /** Bytes of host RAM for all models together, or per kind of device (see MemoryBudget). */
  memoryBudget: MemoryBudget | number;
  /** Idle time after which a model is unloaded even without memory pressure (ms). Default: never. */
  keepAlive?: number;
  /** How long a load may wait for busy models to become idle before it fails (ms). Default 300 000. */
  loadTimeout?: number;
}

export interface RuntimeModelOptions extends Omit<LoadModelOptions, 'memoryBudget' | 'onProgress'> {
  /** This model's idle time before unloading (ms); overrides the runtime's keepAlive. */
  keepAlive?: number;
}

export type RuntimeModelState = 'unloaded' | 'loading' | 'loaded' | 'unloading';

export interface RuntimeModelStatus {
  name: string;
  path: string;
  state: RuntimeModelState;
  /** Requests holding the model now. */
  active: number;
  /** Bytes per device this model takes when loaded (from its estimate; {} before the first). */
  memory: Record<string, number>;
  loads: number;
  unloads: number;
  /** Date.now() of the last release, 0 if never used. */
  lastUsed: number;
}

/** A model held for one request: release() it when done (the runtime may then unload it). */
export interface ModelLease {
  model: Model;
  release(): void;
}

interface Entry {
  name: string;
  path: string;
  options: RuntimeModelOptions;
  state: RuntimeModelState;
  model: Model | undefined;
  loading: Promise<Model> | undefined;
  estimate: MemoryEstimate | undefined;
  active: number;
  lastUsed: number;
  loads: number;
  unloads: number;
  timer: NodeJS.Timeout | undefined;
}

const perDevice = (e: MemoryEstimate): Record<string, number> => Object.fromEntries(e.devices.map((d) => [d.device, d.total]));

function describe(e: Entry): RuntimeModelStatus {
  return {
    name: e.name,
    path: e.path,
    state: e.state,
    active: e.active,
    memory: e.estimate ? perDevice(e.estimate) : {},
    loads: e.loads,
    unloads: e.unloads,
    lastUsed: e.lastUsed,
  };
}

export class Runtime implements AsyncDisposable {
  readonly #budgetSpec: MemoryBudget | number;
  readonly #budget = new Map<string, number>();
  readonly #keepAlive: number;
  readonly #loadTimeout: number;
  readonly #entries = new Map<string, Entry>();
  #waiters: Array<() => void> = [];
  #disposed = false;

  constructor(options: RuntimeOptions) {
    if (options === null || typeof options !== 'object') throw new InvalidOptionError('options', 'an object with memoryBudget', options);
    this.#budgetSpec = options.memoryBudget;
    resolveBudget([], options.memoryBudget, false); // validates it
    this.#keepAlive = checkMs('keepAlive', options.keepAlive) ?? Infinity;
    this.#loadTimeout = checkMs('loadTimeout', options.loadTimeout) ?? 300_000;
  }

  /** Makes `name` available; nothing is loaded until the first request (or load()). */
  register(name: string, path: string, options: RuntimeModelOptions = {}): void {
    this.#assertOpen();
    if (typeof name !== 'string' || name.length === 0) throw new InvalidOptionError('name', 'a non-empty string', name);
    if (this.#entries.has(name)) throw new InvalidOptionError('name', `a name not registered yet (${JSON.stringify(name)} is)`, name);
    if (typeof path !== 'string' || path.length === 0) throw new InvalidOptionError('path', 'a path to a .gguf file', path);
    checkMs('keepAlive', options.keepAlive);
    this.#entries.set(name, {
      name, path, options, state: 'unloaded', model: undefined, loading: undefined, estimate: undefined,
      active: 0, lastUsed: 0, loads: 0, unloads: 0, timer: undefined,
    });
  }

  /** register() if `path` is given, then load now (unloading idle models if it needs the room). */
  async load(name: string, path?: string, options?: RuntimeModelOptions): Promise<Model> {
    if (path !== undefined) this.register(name, path, options);
    const entry = this.#entry(name);
    entry.active++;
    try {
      return await this.#ensure(entry);
    } finally {
      this.#release(entry);
    }
  }

  /** Loads `name` only if it fits beside what is resident without unloading anything. */
  async preload(name: string): Promise<boolean> {
    const entry = this.#entry(name);
    if (entry.state === 'loaded') return true;
    const need = perDevice(await this.#estimate(entry));
    if (!this.#fitsNow(entry, need)) return false;
    await this.load(name);
    return true;
  }

  /** Holds the model for a request, loading it if needed; release() when done. */
  async acquire(name: string): Promise<ModelLease> {
    const entry = this.#entry(name);
    entry.active++;
    if (entry.timer) clearTimeout(entry.timer);
    let model: Model;
    try {
      model = await this.#ensure(entry);
    } catch (error) {
      this.#release(entry);
      throw error;
    }
    let released = false;
    return {
      model,
      release: () => {
        if (released) return;
        released = true;
        this.#release(entry);
      },
    };
  }

  /** The model if it is loaded now (no loading, no lease). */
  loaded(name: string): Model | undefined {
    const entry = this.#entry(name);
    return entry.state === 'loaded' ? entry.model : undefined;
  }

  generate(name: string, prompt: string | readonly number[], options?: GenerateOptions): Promise<Generation> {
    return this.#with(name, (model) => model.generate(prompt, options));
  }

  async complete(name: string, prompt: string | readonly number[], options?: GenerateOptions): Promise<GenerationResult> {
    return (await this.generate(name, prompt, options)).result;
  }

  chat(name: string, messages: ChatMessage[], options?: ChatOptions): Promise<Generation> {
    return this.#with(name, (model) => model.chat(messages, options));
  }

  /**
   * Logit fusion over registered models (see fuse()): each generation holds a lease on every
   * member while it runs, so none is unloaded under it.
   */
  fuse(members: Array<{ model: string; weight: number }>): {
    generate(prompt: string | readonly number[], options?: GenerateOptions): Promise<Generation>;
    complete(prompt: string | readonly number[], options?: GenerateOptions): Promise<GenerationResult>;
  } {
    if (!Array.isArray(members) || members.length === 0) throw new InvalidOptionError('members', 'a non-empty array of { model: name, weight }', members);
    for (const m of members) this.#entry(m?.model);
    const generate = async (prompt: string | readonly number[], options?: GenerateOptions): Promise<Generation> => {
      const leases: ModelLease[] = [];
      const releaseAll = () => leases.forEach((l) => l.release());
      try {
        for (const m of members) leases.push(await this.acquire(m.model));
        const generation = fuse(members.map((m, i) => ({ model: leases[i]!.model, weight: m.weight }))).generate(prompt, options);
        generation.result.then(releaseAll, releaseAll);
        return generation;
      } catch (error) {
        releaseAll();
        throw error;
      }
    };
    return { generate, complete: async (prompt, options) => (await generate(prompt, options)).result };
  }

  async embed(name: string, input: string | readonly string[]): Promise<EmbeddingResult> {
    const lease = await this.acquire(name);
    try {
      return await lease.model.embed(input);
    } finally {
      lease.release();
    }
  }

  /** Unloads `name` now (waiting for its requests to finish first). */
  async unload(name: string): Promise<void> {
    const entry = this.#entry(name);
    while (entry.active > 0 || entry.state === 'loading') await this.#waitForChange(Infinity);
    await this.#unload(entry);
  }

  status(): RuntimeModelStatus[] {
    return [...this.#entries.values()].map(describe);
  }

  /** One model's status (InvalidOptionError for an unknown name). */
  statusOf(name: string): RuntimeModelStatus {
    return describe(this.#entry(name));
  }

  names(): string[] {
    return [...this.#entries.keys()];
  }

  /** Bytes per device held by loaded (and loading) models, and each device's budget. */
  usage(): Array<{ device: string; used: number; budget: number }> {
    return [...this.#budget].map(([device, budget]) => ({ device, used: this.#used(device), budget }));
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const e of this.#entries.values()) if (e.timer) clearTimeout(e.timer);
    await Promise.all([...this.#entries.values()].map(async (e) => {
      await e.loading?.catch(() => undefined);
      await e.model?.dispose();
      e.model = undefined;
      e.state = 'unloaded';
    }));
    this.#wake();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  async #with(name: string, start: (model: Model) => Generation): Promise<Generation> {
    const lease = await this.acquire(name);
    let generation: Generation;
    try {
      generation = start(lease.model);
    } catch (error) {
      lease.release();
      throw error;
    }
    generation.result.then(lease.release, lease.release);
    return generation;
  }

  #entry(name: string): Entry {
    this.#assertOpen();
    const entry = this.#entries.get(name);
    if (!entry) throw new InvalidOptionError('name', `a registered model (${[...this.#entries.keys()].join(', ') || 'none registered'})`, name);
    return entry;
  }

  #assertOpen(): void {
    if (this.#disposed) throw new DisposedError('runtime');
  }

  async #estimate(entry: Entry): Promise<MemoryEstimate> {
    entry.estimate ??= await estimateMemory(entry.path, entry.options);
    for (const [device, bytes] of resolveBudget(entry.estimate.devices, this.#budgetSpec, false)) {
      if (!this.#budget.has(device)) this.#budget.set(device, bytes);
    }
    return entry.estimate;
  }

  #used(device: string, except?: Entry): number {
    let used = 0;
    for (const e of this.#entries.values()) {
      if (e === except || e.state === 'unloaded' || !e.estimate) continue;
      used += perDevice(e.estimate)[device] ?? 0;
    }
    return used;
  }

  #fitsNow(entry: Entry, need: Record<string, number>): boolean {
    return Object.entries(need).every(([device, bytes]) => this.#used(device, entry) + bytes <= (this.#budget.get(device) ?? 0));
  }

  #ensure(entry: Entry): Promise<Model> {
    if (entry.state === 'loaded' && entry.model) return Promise.resolve(entry.model);
    entry.loading ??= this.#load(entry).finally(() => {
      entry.loading = undefined;
    });
    return entry.loading;
  }

  async #load(entry: Entry): Promise<Model> {
    // An unload in progress finishes first (its memory is still counted until then).
    while (entry.state === 'unloading') await this.#waitForChange(Infinity);
    const need = perDevice(await this.#estimate(entry));
    for (const [device, bytes] of Object.entries(need)) {
      const budget = this.#budget.get(device) ?? 0;
      if (bytes > budget) {
        throw new MemoryBudgetError(device, bytes, budget,
          `model ${entry.name} needs ${formatBytes(bytes)} on ${device} but the runtime's budget there is ${formatBytes(budget)}; ` +
            'give it a smaller contextSize or maxSequences, or a larger memoryBudget');
      }
    }
    const deadline = Date.now() + this.#loadTimeout;
    while (!this.#fitsNow(entry, need)) {
      const victim = [...this.#entries.values()]
        .filter((e) => e !== entry && e.state === 'loaded' && e.active === 0)
        .sort((a, b) => a.lastUsed - b.lastUsed)[0];
      if (victim) {
        await this.#unload(victim);
        continue;
      }
      // Everything resident is busy (or still loading): wait for a release, never fail a request
      // because of a model that is merely idle.
      if (!(await this.#waitForChange(deadline - Date.now()))) {
        const busy = [...this.#entries.values()].filter((e) => e !== entry && e.state !== 'unloaded').map((e) => e.name);
        const [device, bytes] = Object.entries(need).find(([d, b]) => this.#used(d, entry) + b > (this.#budget.get(d) ?? 0))!;
        throw new MemoryBudgetError(device, bytes, this.#budget.get(device) ?? 0,
          `model ${entry.name} needs ${formatBytes(bytes)} on ${device}; ${formatBytes(this.#used(device, entry))} of the ` +
            `${formatBytes(this.#budget.get(device) ?? 0)} budget stayed held by models in use (${busy.join(', ')}) for ${this.#loadTimeout} ms`);
      }
      this.#assertOpen();
    }
    entry.state = 'loading'; // counted from here on, so a concurrent load sees the room as taken
    try {
      entry.model = await loadModel(entry.path, entry.options);
    } catch (error) {
      entry.state = 'unloaded';
      this.#wake();
      throw error;
    }
    entry.state = 'loaded';
    entry.loads++;
    if (this.#disposed) {
      await this.#unload(entry);
      throw new DisposedError('runtime');
    }
    return entry.model;
  }

  async #unload(entry: Entry): Promise<void> {
    if (entry.state !== 'loaded' || !entry.model) return;
    if (entry.timer) clearTimeout(entry.timer);
    entry.state = 'unloading';
    const model = entry.model;
    entry.model = undefined;
    try {
      await model.dispose();
    } finally {
      entry.state = 'unloaded';
      entry.unloads++;
      this.#wake();
    }
  }

  #release(entry: Entry): void {
    entry.active = Math.max(0, entry.active - 1);
    entry.lastUsed = Date.now();
    if (entry.active === 0 && entry.model?.lostDevice) {
      // An RPC server of this model was lost: its weights there are gone. Unload it now; the next
      // request loads it again (RPC_UNREACHABLE until the server is back).
      void this.#unload(entry);
    } else if (entry.active === 0) {
      const keepAlive = entry.options.keepAlive ?? this.#keepAlive;
      if (Number.isFinite(keepAlive) && entry.state === 'loaded') {
        if (entry.timer) clearTimeout(entry.timer);
        entry.timer = setTimeout(() => {
          if (entry.active === 0) void this.#unload(entry);
        }, keepAlive);
        entry.timer.unref();
      }
    }
    this.#wake();
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }

  /** Resolves true on the next release/unload, false after `ms`. */
  #waitForChange(ms: number): Promise<boolean> {
    if (ms <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const timer = Number.isFinite(ms) ? setTimeout(() => resolve(false), ms) : undefined;
      this.#waiters.push(() => {
        if (timer) clearTimeout(timer);
        resolve(true);
      });
    });
  }
}

function checkMs(option: string, v: number | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || Number.isNaN(v) || v < 0) throw new InvalidOptionError(option, 'milliseconds ≥ 0 (Infinity: never)', v);
  return v;
}

export function createRuntime(options: RuntimeOptions): Runtime {
  return new Runtime(options);
}
