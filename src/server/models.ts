/** The models a server routes to, by the request's `model` field. */
import type { Model } from '../model.js';
import { modelNotFound } from './errors.js';

export interface ServedModelInput {
  name: string;
  model: Model;
  /** The model has random weights (the built-in demo): /v1/models and the chat page say so. */
  randomWeights?: boolean;
}

export interface ServedModel {
  name: string;
  model: Model;
  randomWeights: boolean;
  /** Unix seconds when the server started serving it. */
  created: number;
}

export type ModelsOption = ReadonlyMap<string, Model> | readonly ServedModelInput[];

export class ModelRegistry {
  readonly #byName = new Map<string, ServedModel>();

  constructor(models: ModelsOption) {
    const created = Math.floor(Date.now() / 1000);
    const entries: ServedModelInput[] =
      models instanceof Map ? [...models].map(([name, model]) => ({ name, model })) : [...(models as readonly ServedModelInput[])];
    if (entries.length === 0) throw new Error('buildServer needs at least one model');
    for (const entry of entries) {
      if (typeof entry.name !== 'string' || entry.name.length === 0) throw new Error('every served model needs a non-empty name');
      if (this.#byName.has(entry.name)) throw new Error(`two models are named ${JSON.stringify(entry.name)}: names must be unique`);
      this.#byName.set(entry.name, {
        name: entry.name,
        model: entry.model,
        // The synthetic generator names its models '... (synthetic, random weights)'.
        randomWeights: entry.randomWeights ?? /random weights/i.test(entry.model.info.name),
        created,
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
    const { model } = served;
    const info = model.info;
    return {
      id: served.name,
      object: 'model',
      created: served.created,
      owned_by: 'genesis',
      meta: {
        architecture: info.architecture,
        name: info.name,
        parameters: info.parameters,
        context: info.context.contextSize,
        max_sequences: info.context.maxSequences,
        vocab_size: info.vocabSize,
        chat_template: info.chatTemplate !== null,
        random_weights: served.randomWeights,
        state: model.disposed ? 'disposed' : 'ready',
      },
    };
  }
}
