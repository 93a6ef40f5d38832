/** The models a server routes to, by the request's `model` field. */
import type { Model, ModelInfo } from '../model.js';
import type { ModelLease, Runtime } from '../runtime.js';
import { modelNotFound } from './errors.js';

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

  constructor(models: ModelsOption) {
    const created = Math.floor(Date.now() / 1000);
    if ('runtime' in models) {
      const runtime = models.runtime;
      this.runtime = runtime;
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

  /** The model named `name`; 404 model_not_found otherwise. */
  get(name: string): ServedModel {
    const served = this.#byName.get(name);
    if (!served) throw modelNotFound(name, this.names());
    return served;
  }

  describe(served: ServedModel): Record<string, unknown> {
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
}
