import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ContextOverflowError, DisposedError, InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const dot = (a: number[], b: number[]) => a.reduce((s, x, i) => s + x * b[i]!, 0);

describe('embeddings', { timeout: 120_000 }, () => {
  let model: Model;

  beforeAll(async () => {
    model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'f32' }), { contextSize: 64, maxSequences: 2, threads: 1 });
  });
  afterAll(() => model?.dispose());

  it('returns one unit vector of the embedding width per input, deterministic and input-dependent', async () => {
    const r = await model.embed(['the cat sat', 'on the mat', 'the cat sat']);
    expect(r.pooling).toBe('last');
    expect(r.embeddings).toHaveLength(3);
    expect(r.promptTokens).toBe(['the cat sat', 'on the mat', 'the cat sat'].reduce((n, t) => n + model.tokenize(t, { parseSpecial: false }).length, 0));
    for (const v of r.embeddings) {
      expect(v).toHaveLength(64);
      expect(Math.sqrt(dot(v, v))).toBeCloseTo(1, 5);
    }
    expect(r.embeddings[2]).toEqual(r.embeddings[0]);
    expect(dot(r.embeddings[0]!, r.embeddings[1]!)).toBeLessThan(0.9999);
    // Batched in one call or one at a time: the same vectors.
    const single = await model.embed('on the mat');
    expect(single.embeddings[0]).toEqual(r.embeddings[1]);
  });

  it('last-token pooling is the final hidden state the generator sees: equal prefixes, equal vectors only for equal text', async () => {
    const [a, b] = (await model.embed(['alpha beta', 'alpha beta gamma'])).embeddings;
    expect(dot(a!, b!)).toBeLessThan(0.9999);
  });

  it('runs while the engine generates, without changing the generation', async () => {
    const solo = await model.complete('embedding while generating', { temperature: 0, maxTokens: 16, ignoreEos: true });
    const run = model.generate('embedding while generating', { temperature: 0, maxTokens: 16, ignoreEos: true });
    const [embedded, generated] = await Promise.all([model.embed(['x', 'y', 'z']), run.result]);
    expect(embedded.embeddings).toHaveLength(3);
    expect(generated.tokens).toEqual(solo.tokens);
  });

  it('rejects bad input with typed errors', async () => {
    await expect(model.embed([])).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(model.embed([42 as never])).rejects.toMatchObject({ option: 'input[0]' });
    await expect(model.embed('word '.repeat(200))).rejects.toBeInstanceOf(ContextOverflowError);
  });

  it('tokenizeAsync equals tokenize, for a long document too', async () => {
    const text = 'A long document, tokenized off the JS thread. '.repeat(2000);
    expect(await model.tokenizeAsync(text)).toEqual(model.tokenize(text));
    expect(await model.tokenizeAsync('<s> x', { addSpecial: false, parseSpecial: false })).toEqual(
      model.tokenize('<s> x', { addSpecial: false, parseSpecial: false }),
    );
  });

  it('dispose waits for an embedding in flight, then embed throws DisposedError', async () => {
    const other = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'f32' }), { contextSize: 64, maxSequences: 1, threads: 1 });
    const pending = other.embed(Array.from({ length: 16 }, (_, i) => `text number ${i}`));
    const disposed = other.dispose();
    const r = await pending;
    expect(r.embeddings).toHaveLength(16);
    await disposed;
    await expect(other.embed('x')).rejects.toBeInstanceOf(DisposedError);
  });
});
