// The device optimisers in exact float32 order (docs/device-client.md section 4, "AdamW, exactly").
// Every tensor operation is one IEEE operation rounded to float32 (Math.fround on a double result
// is the correctly rounded float32 result for + - * / and sqrt), so updates match devft-edge bit for bit.

const f32 = Math.fround;

export class AdamW {
  constructor(lr) {
    if (!(lr > 0) || !Number.isFinite(lr)) throw new Error(`learning rate must be a positive number, got ${lr}`);
    this.lr = lr;
    this.t = 0;
    this.m = new Map();
    this.v = new Map();
  }

  /** Update every tensor named in `grads` (Float32Arrays) in `params` in place. */
  step(params, grads) {
    this.t += 1;
    const bc1 = 1.0 - 0.9 ** this.t;
    const bc2 = f32(Math.sqrt(1.0 - 0.999 ** this.t));
    const stepSize = f32(this.lr / bc1);
    const c1 = f32(1.0 - 0.9), c2 = f32(0.999), c3 = f32(1.0 - 0.999), eps = f32(1e-8);
    for (const [name, g] of Object.entries(grads)) {
      const p = params[name];
      if (!this.m.has(name)) { this.m.set(name, new Float32Array(p.length)); this.v.set(name, new Float32Array(p.length)); }
      const m = this.m.get(name), v = this.v.get(name);
      for (let i = 0; i < p.length; i++) {
        m[i] = f32(m[i] + f32(c1 * f32(g[i] - m[i])));
        v[i] = f32(v[i] * c2);
        v[i] = f32(v[i] + f32(f32(c3 * g[i]) * g[i]));
        const den = f32(f32(f32(Math.sqrt(v[i])) / bc2) + eps);
        p[i] = f32(p[i] - f32(stepSize * f32(m[i] / den)));
      }
    }
  }
}

export class SGD {
  constructor(lr) {
    if (!(lr > 0) || !Number.isFinite(lr)) throw new Error(`learning rate must be a positive number, got ${lr}`);
    this.lr = f32(lr);
    this.t = 0;
  }

  step(params, grads) {
    this.t += 1;
    for (const [name, g] of Object.entries(grads)) {
      const p = params[name];
      for (let i = 0; i < p.length; i++) p[i] = f32(p[i] - f32(this.lr * g[i]));
    }
  }
}

export function makeOptimizer(name, lr) {
  if (name === 'adamw' || name == null) return new AdamW(lr);
  if (name === 'sgd') return new SGD(lr);
  throw new Error(`optimizer ${JSON.stringify(name)} is not one of adamw, sgd`);
}
