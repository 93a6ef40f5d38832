/**
 * One request's choices (n generations, or prompts × n for /v1/completions) run as a group: started
 * together (a synchronous failure of any cancels the ones already started), cancelled together
 * through one AbortController (client disconnect, server drain timeout), and read either whole or as
 * one merged stream of per-choice events.
 */
import { AbortError } from '../errors.js';
import type { Generation, GenerationResult } from '../generation.js';
import type { ServerMetrics } from './metrics.js';

export type ChoiceEvent =
  | { kind: 'text'; index: number; text: string }
  | { kind: 'done'; index: number; result: GenerationResult }
  | { kind: 'error'; index: number; error: unknown };

export class ChoiceGroup {
  readonly generations: Generation[] = [];
  readonly controller: AbortController;

  constructor(controller: AbortController) {
    this.controller = controller;
  }

  /**
   * Starts `count` generations with `start(i, signal)`. If one throws (queue full, prompt too long,
   * bad option), the others are cancelled and the error propagates to the route.
   */
  static start(
    count: number,
    controller: AbortController,
    start: (index: number, signal: AbortSignal) => Generation,
    observe?: { metrics: ServerMetrics; model: string },
  ): ChoiceGroup {
    const group = new ChoiceGroup(controller);
    try {
      for (let i = 0; i < count; i++) group.generations.push(start(i, controller.signal));
    } catch (error) {
      controller.abort();
      throw error;
    }
    if (observe) {
      for (const generation of group.generations) {
        generation.result.then(
          (result) => observe.metrics.observeResult(observe.model, result),
          (error: unknown) =>
            observe.metrics.observeUnfinished(
              observe.model,
              error instanceof AbortError ? 'abort' : 'error',
              error instanceof AbortError ? (error.partial?.tokens.length ?? 0) : 0,
            ),
        );
      }
    }
    return group;
  }

  cancel(): void {
    this.controller.abort();
  }

  /** Every choice's result, in order; the first failure cancels the rest and rejects. */
  async results(): Promise<GenerationResult[]> {
    try {
      return await Promise.all(this.generations.map((g) => g.result));
    } catch (error) {
      this.cancel();
      throw error;
    }
  }

  /**
   * Chunks of all choices as they come, each choice ending with 'done' or 'error'. Leaving the
   * loop early (or an error event) cancels what is still running.
   */
  async *events(): AsyncGenerator<ChoiceEvent> {
    const queue: ChoiceEvent[] = [];
    let wake: (() => void) | undefined;
    const push = (event: ChoiceEvent) => {
      queue.push(event);
      wake?.();
      wake = undefined;
    };
    this.generations.forEach(async (generation, index) => {
      try {
        for await (const chunk of generation) if (chunk.text.length > 0) push({ kind: 'text', index, text: chunk.text });
        push({ kind: 'done', index, result: await generation.result });
      } catch (error) {
        push({ kind: 'error', index, error });
      }
    });
    let open = this.generations.length;
    try {
      while (open > 0) {
        if (queue.length === 0) await new Promise<void>((resolve) => (wake = resolve));
        const event = queue.shift()!;
        if (event.kind !== 'text') open--;
        yield event;
        if (event.kind === 'error') return;
      }
    } finally {
      if (open > 0) this.cancel();
    }
  }
}
