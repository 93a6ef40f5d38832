import { describe, expect, it } from 'vitest';
import { GenesisError, InvalidOptionError, measureBandwidth, systemInfo } from '../src/index.js';

const MIB = 1024 * 1024;

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => undefined,
    (e: unknown) => e,
  );
}

describe('measureBandwidth', () => {
  it('measures a positive, finite CPU bandwidth and reports what it measured', async () => {
    const result = await measureBandwidth({ device: 'cpu', bytes: 8 * MIB, iterations: 3, warmup: 1, threads: 1 });
    expect(result.device).toBe('CPU');
    expect(typeof result.description).toBe('string');
    expect(result.bytes).toBe(8 * MIB);
    expect(result.iterations).toBe(3);
    for (const rate of [result.bestBytesPerSecond, result.meanBytesPerSecond]) {
      expect(Number.isFinite(rate)).toBe(true);
      expect(rate).toBeGreaterThan(0);
    }
    // The fastest copy is at least as fast as the average one.
    expect(result.bestBytesPerSecond).toBeGreaterThanOrEqual(result.meanBytesPerSecond);
  });

  it('rounds bytes down to whole F32 values', async () => {
    const result = await measureBandwidth({ bytes: MIB + 3, iterations: 1, warmup: 0, threads: 1 });
    expect(result.bytes).toBe(MIB);
  });

  it('rejects bad options with an InvalidOptionError naming the option', async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ bytes: 0 }, 'bytes'],
      [{ bytes: MIB - 1 }, 'bytes'],
      [{ bytes: 64 * 1024 * MIB }, 'bytes'],
      [{ bytes: 1.5 * MIB + 0.5 }, 'bytes'],
      [{ bytes: '8MiB' }, 'bytes'],
      [{ iterations: 0 }, 'iterations'],
      [{ iterations: 1001 }, 'iterations'],
      [{ warmup: -1 }, 'warmup'],
      [{ threads: 0 }, 'threads'],
      [{ threads: 1025 }, 'threads'],
      [{ threads: Number.NaN }, 'threads'],
      [{ device: 'tpu' }, 'device'],
      [{ device: 'cpu', gpuIndex: 0 }, 'gpuIndex'],
      [{ device: 'gpu', gpuIndex: -1 }, 'gpuIndex'],
    ];
    for (const [options, option] of cases) {
      const error = await rejection(measureBandwidth({ threads: 1, ...options } as never));
      expect(error, JSON.stringify(options)).toBeInstanceOf(InvalidOptionError);
      expect((error as InvalidOptionError).code).toBe('INVALID_OPTION');
      expect((error as InvalidOptionError).option, JSON.stringify(options)).toBe(option);
      expect((error as Error).message).toContain(`invalid option ${option}: expected`);
    }
  });

  it.runIf(systemInfo().variant === 'cpu')("rejects device 'gpu' in the CPU build with a typed error", async () => {
    const error = await rejection(measureBandwidth({ device: 'gpu', bytes: 8 * MIB }));
    expect(error).toBeInstanceOf(GenesisError);
    expect(error).toBeInstanceOf(InvalidOptionError);
    expect((error as InvalidOptionError).option).toBe('device');
    expect((error as Error).message).toMatch(/no GPU device/);
    // The process carries on: the CPU still measures.
    const result = await measureBandwidth({ bytes: 2 * MIB, iterations: 1, warmup: 0, threads: 1 });
    expect(result.bestBytesPerSecond).toBeGreaterThan(0);
  });

  it('does not block the event loop while it measures', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    try {
      // Hundreds of copies: far longer than a timer tick on any machine. A probe that blocked the
      // JS thread would settle before any timer could fire.
      const probe = measureBandwidth({ bytes: 8 * MIB, iterations: 1000, warmup: 0, threads: 1 }).then(() => ticks);
      const first = await Promise.race([probe.then(() => 'probe'), new Promise((resolve) => setTimeout(resolve, 2)).then(() => 'timer')]);
      expect(first).toBe('timer');
      expect(await probe).toBeGreaterThan(0);
    } finally {
      clearInterval(timer);
    }
  });
});
