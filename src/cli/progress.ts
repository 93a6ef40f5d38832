/** A one-line progress bar on stderr for waits a person sits through (model load, hashing). */
export function progressBar(label: string, width = 30): (fraction: number) => void {
  let last = -1;
  return (fraction) => {
    const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    if (percent === last) return;
    last = percent;
    const filled = Math.round((percent / 100) * width);
    process.stderr.write(`\r${label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${String(percent).padStart(3)}%`);
  };
}
