// safetensors bytes <-> {name: {dtype, shape, data}} (protocol.md section 4): an 8-byte little-endian
// header length, a JSON header with data_offsets, then raw little-endian C-order data.

const DTYPES = { F32: Float32Array, F16: Uint16Array, I64: BigInt64Array, I32: Int32Array, U8: Uint8Array };

export function decodeSafetensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength < 8) throw new Error(`safetensors payload is ${bytes.byteLength} bytes, too short`);
  const n = Number(view.getBigUint64(0, true));
  if (8 + n > bytes.byteLength) throw new Error(`safetensors header of ${n} bytes exceeds the payload`);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const base = 8 + n;
  const out = {};
  for (const [name, spec] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const Ctor = DTYPES[spec.dtype];
    if (!Ctor) throw new Error(`tensor ${name} has dtype ${spec.dtype}; this client reads ${Object.keys(DTYPES)}`);
    const [begin, end] = spec.data_offsets;
    const count = spec.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== count * Ctor.BYTES_PER_ELEMENT || base + end > bytes.byteLength) {
      throw new Error(`tensor ${name}: data_offsets [${begin}, ${end}] do not fit its shape ${spec.shape} or the payload`);
    }
    const copy = new Uint8Array(bytes.subarray(base + begin, base + end)); // an aligned copy (Buffer.slice would be a view)
    out[name] = { dtype: spec.dtype, shape: spec.shape, data: new Ctor(copy.buffer, 0, count) };
  }
  return out;
}

/** Float32 tensors {name: {shape, data: Float32Array}} as safetensors bytes, names sorted. */
export function encodeSafetensors(tensors) {
  const names = Object.keys(tensors).sort();
  const header = {};
  let offset = 0;
  for (const name of names) {
    const t = tensors[name];
    const size = t.data.length * 4;
    header[name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let head = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - (head.length % 8)) % 8; // keep the data 8-byte aligned, as the reference writer does
  if (pad) head = new TextEncoder().encode(JSON.stringify(header) + ' '.repeat(pad));
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let at = 8 + head.length;
  for (const name of names) {
    const d = tensors[name].data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), at);
    at += d.byteLength;
  }
  return out;
}
