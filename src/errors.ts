/**
 * Typed errors. Every error the runtime raises is a GenesisError with a stable `code` that a
 * program can branch on; the message names the input and what was expected.
 *
 * The native addon never constructs JS errors itself: it reports `{ code, message }` and
 * `toGenesisError` maps the code to one of these classes, so the class hierarchy lives in one place.
 */

export type ModelLoadErrorCode =
  | 'MODEL_NOT_FOUND'
  | 'MODEL_UNREADABLE'
  | 'MODEL_NOT_GGUF'
  | 'MODEL_CORRUPT'
  | 'MODEL_UNSUPPORTED_ARCH'
  | 'MODEL_LOAD_FAILED';

export type GenesisErrorCode =
  | ModelLoadErrorCode
  | 'CONTEXT_OVERFLOW'
  | 'INVALID_OPTION'
  | 'QUEUE_FULL'
  | 'SAMPLING'
  | 'ABORTED'
  | 'DISPOSED'
  | 'CHAT_TEMPLATE'
  | 'TOKENIZE'
  | 'ENGINE'
  | 'MEMORY_BUDGET'
  | 'RPC_UNREACHABLE'
  | 'RPC_DISCONNECTED'
  | 'RPC_SERVER'
  | 'MODEL_IN_USE'
  | 'NATIVE_BINDING';

export class GenesisError extends Error {
  readonly code: GenesisErrorCode;

  constructor(code: GenesisErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The model file could not be loaded: missing, unreadable, not GGUF, corrupt or unsupported. */
export class ModelLoadError extends GenesisError {
  declare readonly code: ModelLoadErrorCode;
  readonly path: string;

  constructor(code: ModelLoadErrorCode, path: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.path = path;
  }
}

/** The prompt (plus what must be generated) does not fit the per-sequence context. */
export class ContextOverflowError extends GenesisError {
  readonly promptTokens: number;
  readonly contextSize: number;

  constructor(promptTokens: number, contextSize: number, message?: string) {
    super(
      'CONTEXT_OVERFLOW',
      message ??
        `prompt has ${promptTokens} tokens but the context holds ${contextSize} tokens per sequence ` +
          `(at least one token must be left to generate); shorten the prompt or load with a larger contextSize`,
    );
    this.promptTokens = promptTokens;
    this.contextSize = contextSize;
  }
}

/** An option had an impossible value. `option` names it, `expected` says what is allowed. */
export class InvalidOptionError extends GenesisError {
  readonly option: string;
  readonly expected: string;
  readonly received: unknown;

  constructor(option: string, expected: string, received: unknown, message?: string) {
    super('INVALID_OPTION', message ?? `invalid option ${option}: expected ${expected}, got ${describe(received)}`);
    this.option = option;
    this.expected = expected;
    this.received = received;
  }
}

/** maxQueue requests already wait for a sequence: retry later (a server answers 429). */
export class QueueFullError extends GenesisError {
  constructor(message: string) {
    super('QUEUE_FULL', message);
  }
}

/** The generation was cancelled through its AbortSignal. `partial` holds what was produced. */
export class AbortError extends GenesisError {
  readonly partial: { text: string; tokens: number[] } | undefined;

  constructor(message = 'the generation was aborted', partial?: { text: string; tokens: number[] }) {
    super('ABORTED', message);
    this.partial = partial;
  }
}

/**
 * Nothing fits the memory budget: not even the smallest context with the best placement of the
 * weights. `device` names the memory that is short, `needed` and `budget` are in bytes.
 */
export class MemoryBudgetError extends GenesisError {
  readonly device: string;
  readonly needed: number;
  readonly budget: number;

  constructor(device: string, needed: number, budget: number, message: string) {
    super('MEMORY_BUDGET', message);
    this.device = device;
    this.needed = needed;
    this.budget = budget;
  }
}

/**
 * A llama.cpp RPC server (a model's remote device) could not be reached at load
 * (RPC_UNREACHABLE), was lost while the model used it (RPC_DISCONNECTED: every request of that
 * model fails with it until the model is disposed and loaded again), or could not serve
 * (RPC_SERVER, genesis rpc-server). The message names the host:port.
 */
export class RpcError extends GenesisError {
  declare readonly code: 'RPC_UNREACHABLE' | 'RPC_DISCONNECTED' | 'RPC_SERVER';

  constructor(code: 'RPC_UNREACHABLE' | 'RPC_DISCONNECTED' | 'RPC_SERVER', message: string) {
    super(code, message);
  }
}

/** The model (or runtime object) was disposed before or during the call. */
export class DisposedError extends GenesisError {
  constructor(what = 'model') {
    super('DISPOSED', `the ${what} has been disposed`);
  }
}

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  return `a value of type ${typeof value}`;
}

const modelLoadCodes = new Set<string>([
  'MODEL_NOT_FOUND',
  'MODEL_UNREADABLE',
  'MODEL_NOT_GGUF',
  'MODEL_CORRUPT',
  'MODEL_UNSUPPORTED_ARCH',
  'MODEL_LOAD_FAILED',
]);

/** Shape in which the native addon reports failures. */
export interface NativeFailure {
  code: string;
  message: string;
  path?: string;
  option?: string;
  expected?: string;
}

export function toGenesisError(failure: NativeFailure): GenesisError {
  if (modelLoadCodes.has(failure.code)) {
    return new ModelLoadError(failure.code as ModelLoadErrorCode, failure.path ?? '', failure.message);
  }
  switch (failure.code) {
    case 'ABORTED':
      return new AbortError(failure.message);
    case 'DISPOSED':
      return new DisposedError();
    case 'INVALID_OPTION':
      return new InvalidOptionError(failure.option ?? 'options', failure.expected ?? 'a valid value', undefined, failure.message);
    case 'QUEUE_FULL':
      return new QueueFullError(failure.message);
    case 'RPC_UNREACHABLE':
    case 'RPC_DISCONNECTED':
    case 'RPC_SERVER':
      return new RpcError(failure.code, failure.message);
    case 'CONTEXT_OVERFLOW':
    case 'SAMPLING':
    case 'CHAT_TEMPLATE':
    case 'TOKENIZE':
    case 'MODEL_IN_USE':
    case 'NATIVE_BINDING':
      return new GenesisError(failure.code, failure.message);
    default:
      return new GenesisError('ENGINE', failure.message);
  }
}
