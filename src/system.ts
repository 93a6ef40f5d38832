import { binding, type NativeSystemInfo } from './binding.js';

/** What the loaded native binary supports: variant (cpu/cuda), GPU offload, llama.cpp's CPU features. */
export function systemInfo(): NativeSystemInfo {
  return binding().systemInfo();
}
