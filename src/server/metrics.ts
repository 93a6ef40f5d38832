/**
 * Prometheus metrics with prom-client, in a Registry of the server's own (never the global one, so
 * several servers in one process do not collide). Engine gauges are read from `model.stats()` at
 * scrape time.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { GenerationResult } from '../generation.js';
import type { ExpertStats, Model } from '../model.js';
import type { FusedServedModel } from './fused.js';
import type { ServedModel } from './models.js';

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5];

export class ServerMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<'endpoint' | 'method' | 'status'>;
  readonly requestDuration: Histogram<'endpoint'>;
  readonly promptTokens: Counter<'model'>;
  readonly completionTokens: Counter<'model'>;
  readonly generations: Counter<'model' | 'finish_reason'>;
  readonly timeToFirstToken: Histogram<'model'>;
  readonly timePerOutputToken: Histogram<'model'>;

  constructor(
    models: () => readonly ServedModel[],
    options: {
      processMetrics?: boolean;
      inFlight?: () => number;
      memory?: () => Array<{ device: string; used: number; budget: number }>;
      /** Fused models: their requests count under their own name; their members' engines count the work. */
      fused?: () => readonly FusedServedModel[];
    } = {},
  ) {
    const registers = [this.registry];
    this.requests = new Counter({
      name: 'genesis_http_requests_total',
      help: 'HTTP requests answered, by route, method and status (499: the client closed the connection first).',
      labelNames: ['endpoint', 'method', 'status'],
      registers,
    });
    this.requestDuration = new Histogram({
      name: 'genesis_http_request_duration_seconds',
      help: 'Time from request to the end of the response (streams included), by route.',
      labelNames: ['endpoint'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.promptTokens = new Counter({
      name: 'genesis_prompt_tokens_total',
      help: 'Prompt tokens processed (each of n choices counts its prompt).',
      labelNames: ['model'],
      registers,
    });
    this.completionTokens = new Counter({
      name: 'genesis_completion_tokens_total',
      help: 'Tokens generated, including those of generations cancelled by a disconnect.',
      labelNames: ['model'],
      registers,
    });
    this.generations = new Counter({
      name: 'genesis_generations_total',
      help: "Generations ended, by the runtime's finish reason (eog, stop, length, context) or abort/error.",
      labelNames: ['model', 'finish_reason'],
      registers,
    });
    this.timeToFirstToken = new Histogram({
      name: 'genesis_time_to_first_token_seconds',
      help: 'Submit to first generated token, queueing and prompt processing included (engine clock).',
      labelNames: ['model'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.timePerOutputToken = new Histogram({
      name: 'genesis_time_per_output_token_seconds',
      help: 'Inter-token latency: time between consecutive generated tokens (each token after the first of a generation is one observation of its generation’s mean).',
      labelNames: ['model'],
      buckets: TOKEN_LATENCY_BUCKETS,
      registers,
    });

    type Stats = ReturnType<Model['stats']>;
    // Engine figures are read at scrape time from every model still loaded.
    const eachLoaded = (visit: (model: string, stats: Stats) => void) => {
      for (const served of models()) {
        const model = served.current();
        if (model && !model.disposed) visit(served.name, model.stats());
      }
    };
    const engineGauge = (name: string, help: string, read: (s: Stats) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['model'],
        registers,
        collect() {
          this.reset();
          eachLoaded((model, stats) => this.set({ model }, read(stats)));
        },
      });
    engineGauge('genesis_queue_depth', 'Requests waiting for a free sequence.', (s) => s.queued);
    engineGauge('genesis_active_sequences', 'Sequences generating or prefilling.', (s) => s.active);
    engineGauge('genesis_kv_used_tokens', 'Tokens held in the KV cache by active sequences.', (s) => s.kvUsedTokens);
    engineGauge('genesis_kv_capacity_tokens', 'Tokens the KV cache can hold (contextSize × maxSequences).', (s) => s.kvCapacityTokens);
    engineGauge('genesis_state_checkpoint_bytes', 'Recurrent and hybrid models: host memory held by copies of sequences\' recurrent states (stateCheckpoints).', (s) => s.stateCheckpointBytes);
    engineGauge('genesis_kv_pool_used_tokens', 'kvBudget or kvPaged: cells of the shared KV pool held by running sequences and the cache of finished ones, shared cells once.', (s) => s.kvPoolUsedTokens);
    engineGauge('genesis_kv_pool_blocks_used', 'kvBudget or kvPaged: blocks of the shared KV pool (kvBlockSize cells each) holding a used cell.', (s) => s.kvPoolUsedBlocks);
    engineGauge('genesis_kv_pool_blocks_free', 'kvBudget or kvPaged: blocks of the shared KV pool free for new tokens.', (s) => s.kvPoolBlocks - s.kvPoolUsedBlocks);
    engineGauge('genesis_kv_swap_bytes', 'Host memory held by the KV of preempted sequences waiting to be admitted again (kvSwapMemory).', (s) => s.kvSwapBytes);
    engineGauge('genesis_prompt_cache_hit_ratio', 'Share of admitted prompt tokens reused from the prompt cache instead of decoded, since load.', (s) => (s.promptTokens > 0 ? s.cachedPromptTokens / s.promptTokens : 0));
    // Totals read at scrape time (prom-client counters have no set(): reset, then add).
    const scrapedCounter = (name: string, help: string, each: (add: (model: string, value: number) => void) => void) =>
      new Counter({
        name,
        help,
        labelNames: ['model'],
        registers,
        collect() {
          this.reset();
          each((model, value) => this.inc({ model }, value));
        },
      });
    const engineCounter = (name: string, help: string, read: (s: Stats) => number) =>
      scrapedCounter(name, help, (add) => eachLoaded((model, stats) => add(model, read(stats))));
    engineCounter('genesis_engine_steps_total', 'Engine steps (one llama_decode each) since load.', (s) => s.steps);
    engineCounter('genesis_decoded_tokens_total', 'Tokens decoded (prompt + generated) since load.', (s) => s.decodedTokens);
    engineCounter('genesis_preemptions_total', 'Sequences preempted to make room in the shared KV pool (kvBudget), since load: each recomputed later, or copied out and back with kvSwapMemory.', (s) => s.preemptions);
    engineCounter('genesis_kv_swap_outs_total', 'Preempted sequences whose KV was copied to host memory (kvSwapMemory), since load.', (s) => s.kvSwapOuts);
    engineCounter('genesis_kv_swap_ins_total', 'Preempted sequences whose KV was copied back into the pool instead of recomputed, since load.', (s) => s.kvSwapIns);
    engineCounter('genesis_shared_prefix_copies_total', 'Prompts started from another sequence\'s KV cache (copied, not computed again), since load.', (s) => s.sharedPrefixCopies);
    engineCounter('genesis_state_checkpoint_restores_total', 'Recurrent and hybrid models: prompts started from a copy of a recurrent state (stateCheckpoints), since load.', (s) => s.stateCheckpointRestores);
    engineCounter('genesis_engine_prompt_tokens_total', 'Prompt tokens of the requests the engine admitted (again when a preempted one is readmitted), since load.', (s) => s.promptTokens);
    engineCounter('genesis_prompt_cache_tokens_total', 'Prompt tokens reused from a slot\'s prompt cache instead of decoded, since load.', (s) => s.cachedPromptTokens);
    engineCounter('genesis_draft_tokens_total', 'Speculative decoding: tokens the draft model proposed, since load.', (s) => s.draftTokens);
    engineCounter('genesis_draft_accepted_tokens_total', 'Speculative decoding: proposed tokens the model kept (each one a decode step saved), since load.', (s) => s.acceptedDraftTokens);
    // Expert load, read at scrape time from the models loaded with expertStats (a read waits for
    // the engine's step in flight). The two metrics below share one read per scrape.
    /** `read` of each loaded model that is `wanted`, by served name; a model disposed meanwhile is left out. */
    const readEach = async <T>(wanted: (context: Model['info']['context']) => boolean, read: (model: Model) => Promise<T>): Promise<Array<[string, T]>> => {
      const out: Array<[string, T]> = [];
      for (const served of models()) {
        const model = served.current();
        if (!model || model.disposed || !wanted(model.info.context)) continue;
        try {
          out.push([served.name, await read(model)]);
        } catch {
          // disposed while reading: it has nothing to report any more
        }
      }
      return out;
    };
    let scrape: Promise<Array<[string, ExpertStats]>> | undefined;
    const eachExpertStats = async (visit: (model: string, stats: ExpertStats) => void) => {
      scrape ??= readEach((c) => c.expertStats, (m) => m.expertStats()).finally(() => setImmediate(() => (scrape = undefined)));
      for (const [model, stats] of await scrape) visit(model, stats);
    };
    new Counter({
      name: 'genesis_expert_tokens_total',
      help: 'Tokens routed to each expert of each MoE layer since load (models loaded with expertStats).',
      labelNames: ['model', 'layer', 'expert'],
      registers,
      async collect() {
        this.reset();
        await eachExpertStats((model, stats) => {
          for (const { layer, counts } of stats.layers) {
            counts.forEach((count, expert) => this.inc({ model, layer: String(layer), expert: String(expert) }, count));
          }
        });
      },
    });
    new Gauge({
      name: 'genesis_expert_load_imbalance',
      help: 'Per MoE layer: the busiest expert\'s token count over the mean (1 is balanced); models loaded with expertStats.',
      labelNames: ['model', 'layer'],
      registers,
      async collect() {
        this.reset();
        await eachExpertStats((model, stats) => {
          for (const { layer, imbalance } of stats.layers) this.set({ model, layer: String(layer) }, imbalance);
        });
      },
    });
    new Gauge({
      name: 'genesis_expert_copies_share',
      help: 'Per MoE layer of a model loaded with gpuExperts and expertStats: the share of its expert picks that went to the experts copied to its device, since they were chosen.',
      labelNames: ['model', 'layer'],
      registers,
      async collect() {
        this.reset();
        for (const [model, placement] of await readEach((c) => c.expertPlacement && c.expertStats, (m) => m.expertPlacement())) {
          for (const { layer, routed, routedToCopies } of placement.layers) {
            if (routed > 0) this.set({ model, layer: String(layer) }, routedToCopies / routed);
          }
        }
      },
    });
    new Counter({
      name: 'genesis_engine_seconds_total',
      help: 'Engine thread time since load by phase: step (all of it), decode (the llama_decode call: graph build and kernel launches), wait (for the device to finish a step), sample (sampling and draft verification).',
      labelNames: ['model', 'phase'],
      registers,
      collect() {
        this.reset();
        eachLoaded((model, stats) => {
          for (const [phase, seconds] of Object.entries(stats.seconds)) this.inc({ model, phase }, seconds);
        });
      },
    });
    // Memory per model and device (from the runtime's estimates: what each model takes while
    // loaded, 0 while unloaded), and loads/unloads; only for models served from a runtime.
    new Gauge({
      name: 'genesis_model_memory_bytes',
      help: 'Memory a model holds now, per device (weights, KV cache, compute buffers; 0 when unloaded).',
      labelNames: ['model', 'device'],
      registers,
      collect() {
        this.reset();
        for (const served of models()) {
          const s = served.status();
          for (const [device, bytes] of Object.entries(s.memory ?? {})) this.set({ model: served.name, device }, s.state === 'ready' ? bytes : 0);
        }
      },
    });
    new Gauge({
      name: 'genesis_model_loaded',
      help: '1 when the model is loaded, 0 when not (a runtime loads it on the next request).',
      labelNames: ['model'],
      registers,
      collect() {
        this.reset();
        for (const served of models()) this.set({ model: served.name }, served.current() ? 1 : 0);
      },
    });
    const lifecycle = (name: string, help: string, read: (s: ReturnType<ServedModel['status']>) => number | undefined) =>
      scrapedCounter(name, help, (add) => {
        for (const served of models()) {
          const value = read(served.status());
          if (value !== undefined) add(served.name, value);
        }
      });
    lifecycle('genesis_model_loads_total', 'Times the runtime loaded the model.', (s) => s.loads);
    lifecycle('genesis_model_unloads_total', 'Times the runtime unloaded the model (idle, to make room, or keep-alive).', (s) => s.unloads);
    if (options.memory) {
      const memory = options.memory;
      const budgetGauge = (name: string, help: string, read: (u: { used: number; budget: number }) => number) =>
        new Gauge({
          name,
          help,
          labelNames: ['device'],
          registers,
          collect() {
            this.reset();
            for (const u of memory()) this.set({ device: u.device }, read(u));
          },
        });
      budgetGauge('genesis_memory_budget_bytes', "The runtime's memory budget per device.", (u) => u.budget);
      budgetGauge('genesis_memory_used_bytes', 'Memory held by loaded models per device (estimates).', (u) => u.used);
    }
    if (options.fused) {
      const fused = options.fused;
      new Gauge({
        name: 'genesis_fused_member_weight',
        help: "A fused model's members and their weights (its requests count under model=\"<fused name>\"; its members' engine metrics include its steps).",
        labelNames: ['model', 'member'],
        registers,
        collect() {
          this.reset();
          // One series per member; a model fused with itself adds its weights.
          for (const f of fused()) for (const m of f.members) this.inc({ model: f.name, member: m.served.name }, m.weight);
        },
      });
    }
    if (options.inFlight) {
      const inFlight = options.inFlight;
      new Gauge({
        name: 'genesis_http_requests_in_flight',
        help: 'HTTP requests being answered now.',
        registers,
        collect() {
          this.set(inFlight());
        },
      });
    }
    if (options.processMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  /** Records one finished generation's tokens and latencies. */
  observeResult(model: string, result: GenerationResult): void {
    this.promptTokens.inc({ model }, result.usage.promptTokens);
    this.completionTokens.inc({ model }, result.usage.completionTokens);
    this.generations.inc({ model, finish_reason: result.finishReason });
    if (result.usage.completionTokens > 0) this.timeToFirstToken.observe({ model }, result.timings.timeToFirstTokenMs / 1000);
    const later = result.usage.completionTokens - 1;
    if (later > 0) {
      const perToken = result.timings.generationMs / 1000 / later;
      for (let i = 0; i < later; i++) this.timePerOutputToken.observe({ model }, perToken);
    }
  }

  /** A generation that ended without a result (client gone, error): count what it produced. */
  observeUnfinished(model: string, reason: 'abort' | 'error', completionTokens: number): void {
    if (completionTokens > 0) this.completionTokens.inc({ model }, completionTokens);
    this.generations.inc({ model, finish_reason: reason });
  }
}
