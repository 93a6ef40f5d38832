/**
 * Which native binary a process loads (src/binding.ts chooseBinary): a source build first, else the
 * prebuilds, the CUDA one only when a child process can load it and finds a GPU. A broken CUDA
 * binary (a crashing driver) takes down the probe child, never the host process.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { chooseBinary, packageRoot } from '../src/binding.js';
import { systemInfo } from '../src/index.js';
import { GPU } from './fixtures/gpu.js';

const addon = join(packageRoot, 'build', 'Release', 'genesis.node');
const roots: string[] = [];

/** A package root with prebuilds only: { cpu, cuda } → contents ('addon' copies the real one). */
function fakePackage(files: { cpu?: 'addon'; cuda?: 'addon' | 'garbage' | 'crash' }): string {
  const root = mkdtempSync(join(tmpdir(), 'genesis-loader-'));
  roots.push(root);
  const dir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
  mkdirSync(dir, { recursive: true });
  if (files.cpu) copyFileSync(addon, join(dir, 'genesis-runtime.napi.cpu.node'));
  const cuda = join(dir, 'genesis-runtime.napi.cuda.node');
  if (files.cuda === 'addon') copyFileSync(addon, cuda);
  if (files.cuda === 'garbage') writeFileSync(cuda, 'not a shared object');
  if (files.cuda === 'crash') {
    // A shared object that aborts as it is loaded, as a driver that crashes on initialisation does.
    const source = join(root, 'crash.c');
    writeFileSync(source, '#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n');
    const cc = spawnSync('cc', ['-shared', '-fPIC', '-o', cuda, source], { encoding: 'utf8' });
    if (cc.status !== 0) throw new Error(`cc failed: ${cc.stderr}`);
  }
  return root;
}

afterEach(() => {
  for (const root of roots.splice(0)) rmSync(root, { recursive: true, force: true });
});

describe('native binary choice', () => {
  it('reports the source build this process loaded', () => {
    // The variant the loader reports is the one the addon itself was built as (cpu or cuda).
    expect(systemInfo().binary).toMatchObject({ variant: systemInfo().variant, file: addon, reason: expect.stringContaining('built from source') });
  });

  it('falls back to the CPU prebuild when the CUDA one crashes its probe process, and this process lives on', () => {
    const choice = chooseBinary(fakePackage({ cpu: 'addon', cuda: 'crash' }), {});
    expect(choice.variant).toBe('cpu');
    expect(choice.file).toMatch(/genesis-runtime\.napi\.cpu\.node$/);
    expect(choice.reason).toMatch(/CUDA one crashed the probe process \(SIGABRT\)/);
  });

  it('falls back when the CUDA prebuild does not load, or loads and finds no GPU', () => {
    expect(chooseBinary(fakePackage({ cpu: 'addon', cuda: 'garbage' }), {}).reason).toMatch(/^CPU prebuild: the CUDA one did not load \(.*\)/);
    // A binary that loads but sees no GPU is not chosen. The probe child inherits the environment:
    // with CUDA_VISIBLE_DEVICES empty it sees none, on a GPU machine too.
    const visible = process.env['CUDA_VISIBLE_DEVICES'];
    process.env['CUDA_VISIBLE_DEVICES'] = '';
    try {
      const noGpu = chooseBinary(fakePackage({ cpu: 'addon', cuda: 'addon' }), {});
      expect(noGpu).toMatchObject({ variant: 'cpu', reason: 'CPU prebuild: the CUDA one loaded but found no GPU' });
    } finally {
      if (visible === undefined) delete process.env['CUDA_VISIBLE_DEVICES'];
      else process.env['CUDA_VISIBLE_DEVICES'] = visible;
    }
    if (GPU) {
      // The CUDA build on a GPU machine: the probe finds the GPU and the CUDA prebuild is taken.
      expect(chooseBinary(fakePackage({ cpu: 'addon', cuda: 'addon' }), {})).toMatchObject({ variant: 'cuda', reason: expect.stringContaining('found a GPU') });
    }
  });

  it('takes the CPU prebuild without probing when asked, or when there is no CUDA one', () => {
    expect(chooseBinary(fakePackage({ cpu: 'addon', cuda: 'crash' }), { GENESIS_VARIANT: 'cpu' }).reason).toBe('CPU prebuild: GENESIS_VARIANT=cpu');
    expect(chooseBinary(fakePackage({ cpu: 'addon' }), {}).reason).toBe('CPU prebuild (no CUDA prebuild for this platform)');
    expect(chooseBinary(fakePackage({}), { GENESIS_BINARY: '/opt/x/genesis-runtime.napi.cuda.node' })).toMatchObject({ variant: 'cuda', reason: 'GENESIS_BINARY names it' });
  });

  it('names what is missing when there is nothing to load', () => {
    expect(() => chooseBinary(fakePackage({}), {})).toThrow(/no native binary: neither .*build\/Release\/genesis\.node nor a prebuild/);
    expect(() => chooseBinary(fakePackage({ cuda: 'garbage' }), {})).toThrow(/the CUDA prebuild did not load .*no CPU prebuild/);
  });
});

describe('build variant', () => {
  // CUDA 12 wheels: a regular package nvidia/cublas; CUDA 13 wheels (as on the lent H100): the
  // namespace package nvidia with cuBLAS in nvidia/cu13, shared with the other CUDA libraries.
  it.each([
    { layout: 'cublas', version: 12, init: true },
    { layout: 'cu13', version: 13, init: false },
  ])('is CUDA when nvcc and cuBLAS from the Python nvidia-cublas package (nvidia/$layout) are found, with the links and flags the build needs', ({ layout, version, init }) => {
    const root = mkdtempSync(join(tmpdir(), 'genesis-cuda-'));
    roots.push(root);
    // A fake toolkit (nvcc only) and a fake nvidia-cublas package.
    mkdirSync(join(root, 'bin'));
    writeFileSync(join(root, 'bin', 'nvcc'), '#!/bin/sh\necho fake\n', { mode: 0o755 });
    const pkg = join(root, 'py', 'nvidia', layout);
    mkdirSync(join(pkg, 'lib'), { recursive: true });
    mkdirSync(join(pkg, 'include'));
    if (init) {
      writeFileSync(join(root, 'py', 'nvidia', '__init__.py'), '');
      writeFileSync(join(pkg, '__init__.py'), '');
    }
    for (const lib of [`libcublas.so.${version}`, `libcublasLt.so.${version}`]) writeFileSync(join(pkg, 'lib', lib), '');
    const script = `
      const m = await import(${JSON.stringify(join(packageRoot, 'scripts', 'llama.mjs'))});
      const env = m.cudaBuildEnv('cuda');
      console.log(JSON.stringify({ variant: m.buildVariant(), cuda: m.detectCuda(), env }));`;
    const links = join(packageRoot, 'deps', 'llama.cpp', 'build-cuda', 'cublas-links');
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      encoding: 'utf8',
      env: { ...process.env, GENESIS_CUDA: '', CUDA_HOME: root, PATH: `${join(root, 'bin')}:${process.env.PATH}`, PYTHONPATH: join(root, 'py') },
    });
    try {
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
      expect(out.variant).toBe('cuda');
      expect(out.cuda).toMatchObject({ ok: true, cublas: { libDir: join(pkg, 'lib'), python: pkg } });
      expect(out.env.cmakeArgs).toEqual([`-DCMAKE_LIBRARY_PATH=${links}`, `-DCMAKE_INCLUDE_PATH=${join(pkg, 'include')}`, `-DCMAKE_CUDA_FLAGS=-I${join(pkg, 'include')}`, `-DCMAKE_CXX_FLAGS=-I${join(pkg, 'include')}`]);
      expect(out.env.rpath).toEqual([join(pkg, 'lib')]);
    } finally {
      rmSync(join(packageRoot, 'deps', 'llama.cpp', 'build-cuda', 'cublas-links'), { recursive: true, force: true });
    }
  });

  it('is CPU with GENESIS_CUDA=0 whatever is installed', () => {
    const script = `const m = await import(${JSON.stringify(join(packageRoot, 'scripts', 'llama.mjs'))}); console.log(m.buildVariant());`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, GENESIS_CUDA: '0' } });
    expect(r.stdout.trim()).toBe('cpu');
  });
});
