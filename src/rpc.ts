/**
 * The server side of llama.cpp's RPC backend: lend this machine's devices (GPUs, or the CPU) to
 * models loaded on other machines with `loadModel(path, { rpcServers: ['host:port'] })`. It is
 * upstream's server (ggml_backend_rpc_start_server) from the same pinned source, run inside the
 * addon. It serves one client connection at a time and runs until the process exits.
 *
 * The RPC protocol has no authentication and no encryption: whoever reaches the port can allocate
 * and read the served memory and run graphs on it. It binds a loopback address unless told
 * otherwise, and a non-loopback address needs `allowRemote: true`.
 */
import { connect } from 'node:net';
import { availableParallelism } from 'node:os';
import { binding } from './binding.js';
import { InvalidOptionError, RpcError, toGenesisError } from './errors.js';

export interface RpcServerOptions {
  /** IPv4 address to listen on. Default 127.0.0.1. */
  host?: string;
  /** Default 50052 (upstream rpc-server's). */
  port?: number;
  /** CPU threads when the CPU is served. Default: all available cores. */
  threads?: number;
  /** ggml device names to serve ('CUDA0', 'CPU'). Default: every GPU, else the CPU. */
  devices?: string[];
  /** Cache large tensors on disk here so that reloading a model skips sending them again. */
  cacheDir?: string;
  /** Required to listen on a non-loopback address (a warning is emitted). */
  allowRemote?: boolean;
}

export interface RpcServer {
  /** host:port, as clients name it in rpcServers. */
  endpoint: string;
  /** The devices served, with memory in bytes as they report it. */
  devices: Array<{ name: string; description: string; free: number; total: number }>;
  /** Rejects with an RpcError (RPC_SERVER) if the server ends; it never resolves. */
  stopped: Promise<never>;
}

export function isLoopback(host: string): boolean {
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** Resolves once the server accepts connections on its port. */
export async function startRpcServer(options: RpcServerOptions = {}): Promise<RpcServer> {
  const host = options.host ?? '127.0.0.1';
  const port = options.port ?? 50052;
  if (typeof host !== 'string' || !/^\d{1,3}(\.\d{1,3}){3}$/.test(host)) {
    throw new InvalidOptionError('host', 'an IPv4 address such as 127.0.0.1 (llama.cpp’s RPC server binds IPv4 literals only)', host);
  }
  if (!isLoopback(host)) {
    if (options.allowRemote !== true) {
      throw new InvalidOptionError(
        'host',
        'a loopback address (127.x.x.x), or allowRemote: true — the RPC protocol has no authentication: anyone who reaches the port can read and write the served memory',
        host,
      );
    }
    process.emitWarning(
      `the RPC server listens on ${host}:${port}: the protocol has no authentication or encryption; expose it only to machines you trust (a private network or a firewall rule)`,
      { code: 'GENESIS_RPC_REMOTE' },
    );
  }
  if (options.devices !== undefined && (!Array.isArray(options.devices) || !options.devices.every((d) => typeof d === 'string'))) {
    throw new InvalidOptionError('devices', "an array of device names such as ['CUDA0']", options.devices);
  }
  let native;
  try {
    native = binding().startRpcServer({
      host,
      port,
      threads: options.threads ?? availableParallelism(),
      devices: options.devices,
      cacheDir: options.cacheDir,
    });
  } catch (error) {
    throw toGenesisError(error as { code: string; message: string });
  }
  const stopped = native.stopped.catch((error: unknown) => {
    throw toGenesisError(error as { code: string; message: string });
  }) as Promise<never>;
  stopped.catch(() => {}); // observed by whoever awaits it; never an unhandled rejection here
  await Promise.race([listening(host, port), stopped]);
  return { endpoint: native.endpoint, devices: native.devices, stopped };
}

/** Polls until host:port accepts a TCP connection (closed at once). */
async function listening(host: string, port: number, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect({ host, port });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new RpcError('RPC_SERVER', `the RPC server did not start listening on ${host}:${port} within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
