/**
 * serve(): what `genesis serve` runs. Loads the models (progress on stderr), builds the server,
 * listens, and on SIGTERM/SIGINT drains: new requests get 503, requests in flight finish, the server
 * closes, the models are disposed. `closed` resolves when all of that is done.
 */
import type { MemoryBudget } from '../memory.js';
import { loadModel, type Model } from '../model.js';
import { createRuntime, type Runtime } from '../runtime.js';
import type { LoadModelOptions } from '../options.js';
import { buildServer, ServerConfigError, type GenesisServer, type ServerOptions } from './app.js';
import { isLoopbackHost } from './auth.js';
import { checkFusedSpecs, checkFusedTokenizers, ggufTokenizerDigest } from './fused.js';

export interface ServeModelSpec {
  name: string;
  path: string;
  /** The built-in demo model: said loudly at start-up and on the chat page. */
  randomWeights?: boolean;
  /** Speculative decoding: a draft model (same tokenizer) loaded for this one, or its own MTP layers. */
  draft?: { path: string; maxTokens?: number } | { mtp: true; maxTokens?: number };
}

export interface ServeOptions extends Omit<ServerOptions, 'models' | 'logger'> {
  models: ServeModelSpec[];
  /** Load options for every model (onProgress is set by serve). */
  load?: Omit<LoadModelOptions, 'onProgress'>;
  /** Default 8080; 0 picks a free port. */
  port?: number;
  /** Status lines (default: stderr). */
  log?: (line: string) => void;
  /** Load progress for one model, or undefined for start/end lines only. */
  progress?: (name: string) => ((fraction: number) => void) | undefined;
  /** Fastify request log level ('info' logs every request as JSON on stdout); default none. */
  logLevel?: string;
  /** Drain on SIGTERM/SIGINT. Default true. */
  handleSignals?: boolean;
  /**
   * Serve the models from a Runtime under this budget: the ones that fit are loaded at start, the
   * others on their first request, and idle ones are unloaded when another needs the room.
   * Without it every model is loaded at start and stays loaded.
   */
  memoryBudget?: MemoryBudget | number;
  /** With memoryBudget: unload a model idle this long (ms). Default: only when room is needed. */
  keepAlive?: number;
}

export interface ServeHandle {
  server: GenesisServer;
  url: string;
  /** The models loaded at start (without memoryBudget). */
  models: Model[];
  /** With memoryBudget: the runtime holding the models. */
  runtime: Runtime | undefined;
  /** Drains the server and disposes the models (what a signal does). */
  stop(): Promise<void>;
  /** Resolves once stopped, by stop() or a signal. */
  closed: Promise<void>;
}

export async function serve(options: ServeOptions): Promise<ServeHandle> {
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const host = options.host ?? '127.0.0.1';
  const keys = typeof options.apiKey === 'string' ? [options.apiKey] : [...(options.apiKey ?? [])];
  // Refuse before spending time on loading models.
  if (keys.every((k) => k.length === 0) && !isLoopbackHost(host)) {
    throw new ServerConfigError(
      `refusing to listen on ${host} without an API key: a non-loopback address is reachable from other machines. ` +
        'Pass --api-key KEY (or set GENESIS_API_KEY), or listen on 127.0.0.1.',
    );
  }
  const names = new Set<string>();
  for (const spec of options.models) {
    if (names.has(spec.name)) throw new ServerConfigError(`two models are named ${JSON.stringify(spec.name)}: use --model name=path to tell them apart`);
    names.add(spec.name);
  }

  const fused = options.fused ?? [];
  checkFusedSpecs(fused, [...names]);

  if (options.memoryBudget !== undefined && options.models.some((s) => s.draft && 'path' in s.draft)) {
    throw new ServerConfigError('--draft FILE is not available with --memory-budget yet: the runtime does not count or unload draft models (--draft mtp is)');
  }

  const models: Model[] = [];
  const drafts: Model[] = [];
  const runtime = options.memoryBudget !== undefined ? createRuntime({ memoryBudget: options.memoryBudget, keepAlive: options.keepAlive }) : undefined;
  // Targets before their drafts: a draft in use cannot be disposed.
  const disposeAll = async () => {
    await Promise.all([...models.map((m) => m.dispose()), runtime?.dispose()]);
    await Promise.all(drafts.map((m) => m.dispose()));
  };
  let server: GenesisServer;
  try {
    if (runtime) {
      // Fused members the runtime may not load at start: compare their tokenizers from their files.
      const digests = new Map<string, string>();
      for (const spec of options.models) {
        if (fused.some((f) => f.members.some((m) => m.model === spec.name))) digests.set(spec.name, await ggufTokenizerDigest(spec.path));
      }
      for (const f of fused) checkFusedTokenizers(f, (name) => digests.get(name));
      for (const spec of options.models) {
        runtime.register(spec.name, spec.path, { ...options.load, ...(spec.draft && 'mtp' in spec.draft ? { draft: spec.draft } : {}) });
      }
      for (const spec of options.models) {
        const started = performance.now();
        const loaded = await runtime.preload(spec.name);
        const memory = Object.entries(runtime.statusOf(spec.name).memory)
          .map(([device, bytes]) => `${(bytes / 1024 ** 2).toFixed(0)} MiB on ${device}`)
          .join(', ');
        log(loaded
          ? `loaded ${spec.name} (${memory}; ${((performance.now() - started) / 1000).toFixed(1)} s)`
          : `${spec.name} (${memory}) does not fit beside the models already loaded: it loads on its first request`);
      }
      // A fused model's members are held together: they must fit the budget together.
      for (const f of fused) {
        const members = [...new Set(f.members.map((m) => m.model))];
        for (const { device, budget } of runtime.usage()) {
          const need = members.reduce((n, name) => n + (runtime.statusOf(name).memory[device] ?? 0), 0);
          if (need > budget) {
            throw new ServerConfigError(
              `fused model ${JSON.stringify(f.name)} holds ${members.join(' and ')} loaded together: ${(need / 1024 ** 2).toFixed(0)} MiB on ${device}, ` +
                `more than the memory budget there (${(budget / 1024 ** 2).toFixed(0)} MiB)`,
            );
          }
        }
      }
      const usage = runtime.usage().map((u) => `${(u.used / 1024 ** 2).toFixed(0)} of ${(u.budget / 1024 ** 2).toFixed(0)} MiB on ${u.device}`).join(', ');
      log(`memory budget: ${usage}`);
    }
    for (const spec of runtime ? [] : options.models) {
      let draft: Model | undefined;
      if (spec.draft && 'path' in spec.draft) {
        log(`loading the draft model of ${spec.name} from ${spec.draft.path}`);
        draft = await loadModel(spec.draft.path, { ...options.load, onProgress: options.progress?.(`${spec.name} draft`) });
        drafts.push(draft);
      }
      log(`loading ${spec.name} from ${spec.path}`);
      const started = performance.now();
      const model = await loadModel(spec.path, {
        ...options.load,
        onProgress: options.progress?.(spec.name),
        ...(draft ? { draft: { model: draft, maxTokens: spec.draft!.maxTokens } } : spec.draft && 'mtp' in spec.draft ? { draft: spec.draft } : {}),
      });
      models.push(model);
      const { context } = model.info;
      log(
        `loaded ${spec.name}: ${model.info.architecture}, ${model.info.parameters.toLocaleString('en-US')} parameters, ` +
          `context ${context.contextSize} × ${context.maxSequences} sequences (${((performance.now() - started) / 1000).toFixed(1)} s)`,
      );
      if (spec.randomWeights) log(`${spec.name} is the built-in demo model with RANDOM WEIGHTS: its text is noise; tokens, batching and speed are real`);
    }
    server = buildServer({
      ...options,
      host,
      models: runtime
        ? { runtime, randomWeights: options.models.filter((s) => s.randomWeights).map((s) => s.name) }
        : options.models.map((spec, i) => ({ name: spec.name, model: models[i]!, randomWeights: spec.randomWeights })),
      logger: options.logLevel ? { level: options.logLevel } : false,
    });
    await server.listen({ host, port: options.port ?? 8080 });
  } catch (error) {
    await disposeAll();
    throw error;
  }

  const address = server.server.address();
  const port = typeof address === 'object' && address ? address.port : options.port;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  const fusedNames = fused.map((f) => `${f.name} (fused: ${f.members.map((m) => `${m.model} × ${m.weight}`).join(', ')})`);
  log(`serving ${[...options.models.map((m) => m.name), ...fusedNames].join(', ')} on ${url}`);
  log(`  chat page ${url}/   OpenAI API ${url}/v1   health ${url}/health   metrics ${url}/metrics`);
  log(keys.some((k) => k.length > 0) ? '  API key required (Authorization: Bearer <key>)' : '  no API key (loopback only)');

  let stopping: Promise<void> | undefined;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((resolve) => (resolveClosed = resolve));
  const signals: NodeJS.Signals[] = ['SIGTERM', 'SIGINT'];
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      try {
        await server.drain();
        await disposeAll();
      } finally {
        for (const signal of signals) process.off(signal, onSignal);
        resolveClosed();
      }
    })();
    return stopping;
  };
  let signalled = 0;
  function onSignal(signal: NodeJS.Signals): void {
    signalled++;
    if (signalled > 1) {
      log(`${signal} again: exiting without waiting`);
      process.exit(130);
    }
    const resident = runtime ? runtime.names().map((n) => runtime.loaded(n)).filter((m) => m !== undefined) : models;
    const active = resident.reduce((n, m) => n + (m.disposed ? 0 : m.stats().active + m.stats().queued), 0);
    log(`${signal}: draining (${active} generation${active === 1 ? '' : 's'} in flight; new requests get 503), then exiting`);
    stop().then(
      () => log('drained; models disposed; bye'),
      (error: unknown) => log(`error while stopping: ${(error as Error).message}`),
    );
  }
  if (options.handleSignals ?? true) for (const signal of signals) process.on(signal, onSignal);
  return { server, url, models, runtime, stop, closed };
}
