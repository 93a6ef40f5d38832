/** The models a server routes to, by the request's `model` field, and the fused models over them. */
import type { Model, ModelInfo } from '../model.js';
import type { ModelLease, Runtime } from '../runtime.js';
import { invalidRequest, modelNotFound } from './errors.js';
import { checkFusedSpecs, checkFusedTokenizers, isFused, makeFusedServedModel, type FusedModelSpec, type FusedServedModel } from './fused.js';

export interface ServedModelInput {
  name: string;
  model: Model;
  /** The model has random weights (the built-in demo): /v1/models and the chat page say so. */
  randomWeights?: boolean;
}

export interface ServedModel {
  name: string;
  /** The GGUF file. */
  path: string;
  randomWeights: boolean;
  /** Unix seconds when the server started serving it. */
  created: number;
  /** Holds the model for one request, loading it first if the runtime had unloaded it. */
  acquire(): Promise<ModelLease>;
  /** The model if it is loaded now (no loading). */
  current(): Model | undefined;
  /** 'ready' | 'disposed' for a fixed model; the runtime's state (and memory, loads, unloads) otherwise. */
  status(): { state: string; memory?: Record<string, number>; loads?: number; unloads?: number };
}

/** Models served from a Runtime (under its memory budget), by their registered names. */
export interface RuntimeModels {
  runtime: Runtime;
  /** Names of models with random weights (the built-in demo). */
  randomWeights?: readonly string[];
}

export type ModelsOption = ReadonlyMap<string, Model> | readonly ServedModelInput[] | RuntimeModels;

export class ModelRegistry {
  readonly #byName = new Map<string, ServedModel>();
  readonly runtime: Runtime | undefined;
  /** The last info seen of each model, so /v1/models can describe one the runtime unloaded. */
  readonly #info = new Map<string, ModelInfo>();
  readonly #fused = new Map<string, FusedServedModel>();

  constructor(models: ModelsOption, fused: readonly FusedModelSpec[] = []) {
    const created = Math.floor(Date.now() / 1000);
    this.runtime = 'runtime' in models ? models.runtime : undefined;
    this.#addModels(models, created);
    checkFusedSpecs(fused, this.names());
    for (const spec of fused) {
      // Models loaded now are compared here; serve() compares a runtime's others from their files.
      checkFusedTokenizers(spec, (name) => this.#byName.get(name)!.current()?.vocabDigest());
      this.#fused.set(spec.name, makeFusedServedModel(spec, (name) => this.#byName.get(name)!, created));
    }
  }

  #addModels(models: ModelsOption, created: number): void {
    if ('runtime' in models) {
      const runtime = models.runtime;
      const random = new Set(models.randomWeights ?? []);
      for (const name of runtime.names()) {
        this.#byName.set(name, {
          name,
          path: runtime.statusOf(name).path,
          randomWeights: random.has(name),
          created,
          acquire: async () => {
            const lease = await runtime.acquire(name);
            this.#info.set(name, lease.model.info);
            return lease;
          },
          current: () => runtime.loaded(name),
          status: () => {
            const s = runtime.statusOf(name);
            return { state: s.state === 'loaded' ? 'ready' : s.state, memory: s.memory, loads: s.loads, unloads: s.unloads };
          },
        });
      }
      if (this.#byName.size === 0) throw new Error('buildServer needs at least one model registered in the runtime');
      return;
    }
    const entries: ServedModelInput[] =
      models instanceof Map ? [...models].map(([name, model]) => ({ name, model })) : [...(models as readonly ServedModelInput[])];
    if (entries.length === 0) throw new Error('buildServer needs at least one model');
    for (const entry of entries) {
      if (typeof entry.name !== 'string' || entry.name.length === 0) throw new Error('every served model needs a non-empty name');
      if (this.#byName.has(entry.name)) throw new Error(`two models are named ${JSON.stringify(entry.name)}: names must be unique`);
      const model = entry.model;
      this.#info.set(entry.name, model.info);
      this.#byName.set(entry.name, {
        name: entry.name,
        path: model.path,
        // The synthetic generator names its models '... (synthetic, random weights)'.
        randomWeights: entry.randomWeights ?? /random weights/i.test(model.info.name),
        created,
        acquire: async () => ({ model, release: () => {} }),
        current: () => (model.disposed ? undefined : model),
        status: () => ({ state: model.disposed ? 'disposed' : 'ready' }),
      });
    }
  }

  list(): ServedModel[] {
    return [...this.#byName.values()];
  }

  names(): string[] {
    return [...this.#byName.keys()];
  }

  /** The fused models, in declaration order. */
  fused(): FusedServedModel[] {
    return [...this.#fused.values()];
  }

  /**
   * The model named `name`, for what needs one model (embeddings, receipts): 400 for a fused
   * model's name, 404 model_not_found for an unknown one.
   */
  get(name: string): ServedModel {
    const served = this.#byName.get(name);
    if (served) return served;
    const fused = this.#fused.get(name);
    if (fused) {
      throw invalidRequest(
        'model',
        `${JSON.stringify(name)} is a fused model (${fused.members.map((m) => m.served.name).join(', ')}): it only generates text ` +
          '(/v1/completions, /v1/chat/completions); name one of its members here.',
        'unsupported_model',
      );
    }
    throw modelNotFound(name, [...this.names(), ...this.#fused.keys()]);
  }

  /** The model or fused model named `name` (what generates text); 404 model_not_found otherwise. */
  lookup(name: string): ServedModel | FusedServedModel {
    const found = this.#byName.get(name) ?? this.#fused.get(name);
    if (!found) throw modelNotFound(name, [...this.names(), ...this.#fused.keys()]);
    return found;
  }

  describe(served: ServedModel | FusedServedModel): Record<string, unknown> {
    if (isFused(served)) return this.#describeFused(served);
    const info = served.current()?.info ?? this.#info.get(served.name);
    const status = served.status();
    return {
      id: served.name,
      object: 'model',
      created: served.created,
      owned_by: 'genesis',
      meta: {
        ...(info
          ? {
              architecture: info.architecture,
              name: info.name,
              parameters: info.parameters,
              context: info.context.contextSize,
              max_sequences: info.context.maxSequences,
              vocab_size: info.vocabSize,
              chat_template: info.chatTemplate !== null,
            }
          : {}),
        random_weights: served.randomWeights,
        state: status.state,
        ...(status.memory ? { memory_bytes: status.memory, loads: status.loads, unloads: status.unloads } : {}),
      },
    };
  }

  /** A fused model: its members and weights, and what its first member gives it (vocabulary, chat template). */
  #describeFused(fused: FusedServedModel): Record<string, unknown> {
    const first = fused.members[0]!.served;
    const info = first.current()?.info ?? this.#info.get(first.name);
    const states = fused.members.map((m) => m.served.status().state);
    return {
      id: fused.name,
      object: 'model',
      created: fused.created,
      owned_by: 'genesis',
      meta: {
        fusion: { members: fused.members.map((m) => ({ model: m.served.name, weight: m.weight })) },
        ...(info ? { vocab_size: info.vocabSize, chat_template: info.chatTemplate !== null } : {}),
        random_weights: fused.randomWeights,
        // Ready when every member is; otherwise the first member state that is not.
        state: states.find((s) => s !== 'ready') ?? 'ready',
      },
    };
  }
}
