// Generated from clients/js/src by 'npm run build' in clients/js: do not edit.
// Includes @msgpack/msgpack 3.1.3, under this license:
/*
 Copyright 2019 The MessagePack Community.

 Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is hereby granted, provided that the above copyright notice and this permission notice appear in all copies.

 THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.
 */
var __defProp = Object.defineProperty;
var __export = (target, all) => {
  for (var name in all)
    __defProp(target, name, { get: all[name], enumerable: true });
};

// src/codec.js
var codec_exports = {};
__export(codec_exports, {
  CloseCode: () => CloseCode,
  FINAL_CLOSE_CODES: () => FINAL_CLOSE_CODES,
  MsgType: () => MsgType,
  PROTOCOL_VERSION: () => PROTOCOL_VERSION,
  PROTO_KEY: () => PROTO_KEY,
  RESUMABLE_CLOSE_CODES: () => RESUMABLE_CLOSE_CODES,
  decodeFrame: () => decodeFrame,
  direct: () => direct,
  encodeFrames: () => encodeFrames,
  encodeMessage: () => encodeMessage,
  event: () => event,
  packFrames: () => packFrames,
  parseMessage: () => parseMessage,
  ping: () => ping,
  shouldReconnect: () => shouldReconnect,
  state: () => state
});

// node_modules/@msgpack/msgpack/dist.esm/utils/utf8.mjs
function utf8Count(str) {
  const strLength = str.length;
  let byteLength = 0;
  let pos = 0;
  while (pos < strLength) {
    let value = str.charCodeAt(pos++);
    if ((value & 4294967168) === 0) {
      byteLength++;
      continue;
    } else if ((value & 4294965248) === 0) {
      byteLength += 2;
    } else {
      if (value >= 55296 && value <= 56319) {
        if (pos < strLength) {
          const extra = str.charCodeAt(pos);
          if ((extra & 64512) === 56320) {
            ++pos;
            value = ((value & 1023) << 10) + (extra & 1023) + 65536;
          }
        }
      }
      if ((value & 4294901760) === 0) {
        byteLength += 3;
      } else {
        byteLength += 4;
      }
    }
  }
  return byteLength;
}
function utf8EncodeJs(str, output, outputOffset) {
  const strLength = str.length;
  let offset = outputOffset;
  let pos = 0;
  while (pos < strLength) {
    let value = str.charCodeAt(pos++);
    if ((value & 4294967168) === 0) {
      output[offset++] = value;
      continue;
    } else if ((value & 4294965248) === 0) {
      output[offset++] = value >> 6 & 31 | 192;
    } else {
      if (value >= 55296 && value <= 56319) {
        if (pos < strLength) {
          const extra = str.charCodeAt(pos);
          if ((extra & 64512) === 56320) {
            ++pos;
            value = ((value & 1023) << 10) + (extra & 1023) + 65536;
          }
        }
      }
      if ((value & 4294901760) === 0) {
        output[offset++] = value >> 12 & 15 | 224;
        output[offset++] = value >> 6 & 63 | 128;
      } else {
        output[offset++] = value >> 18 & 7 | 240;
        output[offset++] = value >> 12 & 63 | 128;
        output[offset++] = value >> 6 & 63 | 128;
      }
    }
    output[offset++] = value & 63 | 128;
  }
}
var sharedTextEncoder = new TextEncoder();
var TEXT_ENCODER_THRESHOLD = 50;
function utf8EncodeTE(str, output, outputOffset) {
  sharedTextEncoder.encodeInto(str, output.subarray(outputOffset));
}
function utf8Encode(str, output, outputOffset) {
  if (str.length > TEXT_ENCODER_THRESHOLD) {
    utf8EncodeTE(str, output, outputOffset);
  } else {
    utf8EncodeJs(str, output, outputOffset);
  }
}
var CHUNK_SIZE = 4096;
function utf8DecodeJs(bytes, inputOffset, byteLength) {
  let offset = inputOffset;
  const end = offset + byteLength;
  const units = [];
  let result = "";
  while (offset < end) {
    const byte1 = bytes[offset++];
    if ((byte1 & 128) === 0) {
      units.push(byte1);
    } else if ((byte1 & 224) === 192) {
      const byte2 = bytes[offset++] & 63;
      units.push((byte1 & 31) << 6 | byte2);
    } else if ((byte1 & 240) === 224) {
      const byte2 = bytes[offset++] & 63;
      const byte3 = bytes[offset++] & 63;
      units.push((byte1 & 31) << 12 | byte2 << 6 | byte3);
    } else if ((byte1 & 248) === 240) {
      const byte2 = bytes[offset++] & 63;
      const byte3 = bytes[offset++] & 63;
      const byte4 = bytes[offset++] & 63;
      let unit = (byte1 & 7) << 18 | byte2 << 12 | byte3 << 6 | byte4;
      if (unit > 65535) {
        unit -= 65536;
        units.push(unit >>> 10 & 1023 | 55296);
        unit = 56320 | unit & 1023;
      }
      units.push(unit);
    } else {
      units.push(byte1);
    }
    if (units.length >= CHUNK_SIZE) {
      result += String.fromCharCode(...units);
      units.length = 0;
    }
  }
  if (units.length > 0) {
    result += String.fromCharCode(...units);
  }
  return result;
}
var sharedTextDecoder = new TextDecoder();
var TEXT_DECODER_THRESHOLD = 200;
function utf8DecodeTD(bytes, inputOffset, byteLength) {
  const stringBytes = bytes.subarray(inputOffset, inputOffset + byteLength);
  return sharedTextDecoder.decode(stringBytes);
}
function utf8Decode(bytes, inputOffset, byteLength) {
  if (byteLength > TEXT_DECODER_THRESHOLD) {
    return utf8DecodeTD(bytes, inputOffset, byteLength);
  } else {
    return utf8DecodeJs(bytes, inputOffset, byteLength);
  }
}

// node_modules/@msgpack/msgpack/dist.esm/ExtData.mjs
var ExtData = class {
  type;
  data;
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/DecodeError.mjs
var DecodeError = class _DecodeError extends Error {
  constructor(message) {
    super(message);
    const proto = Object.create(_DecodeError.prototype);
    Object.setPrototypeOf(this, proto);
    Object.defineProperty(this, "name", {
      configurable: true,
      enumerable: false,
      value: _DecodeError.name
    });
  }
};

// node_modules/@msgpack/msgpack/dist.esm/utils/int.mjs
var UINT32_MAX = 4294967295;
function setUint64(view, offset, value) {
  const high = value / 4294967296;
  const low = value;
  view.setUint32(offset, high);
  view.setUint32(offset + 4, low);
}
function setInt64(view, offset, value) {
  const high = Math.floor(value / 4294967296);
  const low = value;
  view.setUint32(offset, high);
  view.setUint32(offset + 4, low);
}
function getInt64(view, offset) {
  const high = view.getInt32(offset);
  const low = view.getUint32(offset + 4);
  return high * 4294967296 + low;
}
function getUint64(view, offset) {
  const high = view.getUint32(offset);
  const low = view.getUint32(offset + 4);
  return high * 4294967296 + low;
}

// node_modules/@msgpack/msgpack/dist.esm/timestamp.mjs
var EXT_TIMESTAMP = -1;
var TIMESTAMP32_MAX_SEC = 4294967296 - 1;
var TIMESTAMP64_MAX_SEC = 17179869184 - 1;
function encodeTimeSpecToTimestamp({ sec, nsec }) {
  if (sec >= 0 && nsec >= 0 && sec <= TIMESTAMP64_MAX_SEC) {
    if (nsec === 0 && sec <= TIMESTAMP32_MAX_SEC) {
      const rv = new Uint8Array(4);
      const view = new DataView(rv.buffer);
      view.setUint32(0, sec);
      return rv;
    } else {
      const secHigh = sec / 4294967296;
      const secLow = sec & 4294967295;
      const rv = new Uint8Array(8);
      const view = new DataView(rv.buffer);
      view.setUint32(0, nsec << 2 | secHigh & 3);
      view.setUint32(4, secLow);
      return rv;
    }
  } else {
    const rv = new Uint8Array(12);
    const view = new DataView(rv.buffer);
    view.setUint32(0, nsec);
    setInt64(view, 4, sec);
    return rv;
  }
}
function encodeDateToTimeSpec(date) {
  const msec = date.getTime();
  const sec = Math.floor(msec / 1e3);
  const nsec = (msec - sec * 1e3) * 1e6;
  const nsecInSec = Math.floor(nsec / 1e9);
  return {
    sec: sec + nsecInSec,
    nsec: nsec - nsecInSec * 1e9
  };
}
function encodeTimestampExtension(object) {
  if (object instanceof Date) {
    const timeSpec = encodeDateToTimeSpec(object);
    return encodeTimeSpecToTimestamp(timeSpec);
  } else {
    return null;
  }
}
function decodeTimestampToTimeSpec(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  switch (data.byteLength) {
    case 4: {
      const sec = view.getUint32(0);
      const nsec = 0;
      return { sec, nsec };
    }
    case 8: {
      const nsec30AndSecHigh2 = view.getUint32(0);
      const secLow32 = view.getUint32(4);
      const sec = (nsec30AndSecHigh2 & 3) * 4294967296 + secLow32;
      const nsec = nsec30AndSecHigh2 >>> 2;
      return { sec, nsec };
    }
    case 12: {
      const sec = getInt64(view, 4);
      const nsec = view.getUint32(0);
      return { sec, nsec };
    }
    default:
      throw new DecodeError(`Unrecognized data size for timestamp (expected 4, 8, or 12): ${data.length}`);
  }
}
function decodeTimestampExtension(data) {
  const timeSpec = decodeTimestampToTimeSpec(data);
  return new Date(timeSpec.sec * 1e3 + timeSpec.nsec / 1e6);
}
var timestampExtension = {
  type: EXT_TIMESTAMP,
  encode: encodeTimestampExtension,
  decode: decodeTimestampExtension
};

// node_modules/@msgpack/msgpack/dist.esm/ExtensionCodec.mjs
var ExtensionCodec = class _ExtensionCodec {
  static defaultCodec = new _ExtensionCodec();
  // ensures ExtensionCodecType<X> matches ExtensionCodec<X>
  // this will make type errors a lot more clear
  // eslint-disable-next-line @typescript-eslint/naming-convention
  __brand;
  // built-in extensions
  builtInEncoders = [];
  builtInDecoders = [];
  // custom extensions
  encoders = [];
  decoders = [];
  constructor() {
    this.register(timestampExtension);
  }
  register({ type, encode, decode }) {
    if (type >= 0) {
      this.encoders[type] = encode;
      this.decoders[type] = decode;
    } else {
      const index = -1 - type;
      this.builtInEncoders[index] = encode;
      this.builtInDecoders[index] = decode;
    }
  }
  tryToEncode(object, context) {
    for (let i = 0; i < this.builtInEncoders.length; i++) {
      const encodeExt = this.builtInEncoders[i];
      if (encodeExt != null) {
        const data = encodeExt(object, context);
        if (data != null) {
          const type = -1 - i;
          return new ExtData(type, data);
        }
      }
    }
    for (let i = 0; i < this.encoders.length; i++) {
      const encodeExt = this.encoders[i];
      if (encodeExt != null) {
        const data = encodeExt(object, context);
        if (data != null) {
          const type = i;
          return new ExtData(type, data);
        }
      }
    }
    if (object instanceof ExtData) {
      return object;
    }
    return null;
  }
  decode(data, type, context) {
    const decodeExt = type < 0 ? this.builtInDecoders[-1 - type] : this.decoders[type];
    if (decodeExt) {
      return decodeExt(data, type, context);
    } else {
      return new ExtData(type, data);
    }
  }
};

// node_modules/@msgpack/msgpack/dist.esm/utils/typedArrays.mjs
function isArrayBufferLike(buffer) {
  return buffer instanceof ArrayBuffer || typeof SharedArrayBuffer !== "undefined" && buffer instanceof SharedArrayBuffer;
}
function ensureUint8Array(buffer) {
  if (buffer instanceof Uint8Array) {
    return buffer;
  } else if (ArrayBuffer.isView(buffer)) {
    return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  } else if (isArrayBufferLike(buffer)) {
    return new Uint8Array(buffer);
  } else {
    return Uint8Array.from(buffer);
  }
}

// node_modules/@msgpack/msgpack/dist.esm/Encoder.mjs
var DEFAULT_MAX_DEPTH = 100;
var DEFAULT_INITIAL_BUFFER_SIZE = 2048;
var Encoder = class _Encoder {
  extensionCodec;
  context;
  useBigInt64;
  maxDepth;
  initialBufferSize;
  sortKeys;
  forceFloat32;
  ignoreUndefined;
  forceIntegerToFloat;
  pos;
  view;
  bytes;
  entered = false;
  constructor(options) {
    this.extensionCodec = options?.extensionCodec ?? ExtensionCodec.defaultCodec;
    this.context = options?.context;
    this.useBigInt64 = options?.useBigInt64 ?? false;
    this.maxDepth = options?.maxDepth ?? DEFAULT_MAX_DEPTH;
    this.initialBufferSize = options?.initialBufferSize ?? DEFAULT_INITIAL_BUFFER_SIZE;
    this.sortKeys = options?.sortKeys ?? false;
    this.forceFloat32 = options?.forceFloat32 ?? false;
    this.ignoreUndefined = options?.ignoreUndefined ?? false;
    this.forceIntegerToFloat = options?.forceIntegerToFloat ?? false;
    this.pos = 0;
    this.view = new DataView(new ArrayBuffer(this.initialBufferSize));
    this.bytes = new Uint8Array(this.view.buffer);
  }
  clone() {
    return new _Encoder({
      extensionCodec: this.extensionCodec,
      context: this.context,
      useBigInt64: this.useBigInt64,
      maxDepth: this.maxDepth,
      initialBufferSize: this.initialBufferSize,
      sortKeys: this.sortKeys,
      forceFloat32: this.forceFloat32,
      ignoreUndefined: this.ignoreUndefined,
      forceIntegerToFloat: this.forceIntegerToFloat
    });
  }
  reinitializeState() {
    this.pos = 0;
  }
  /**
   * This is almost equivalent to {@link Encoder#encode}, but it returns an reference of the encoder's internal buffer and thus much faster than {@link Encoder#encode}.
   *
   * @returns Encodes the object and returns a shared reference the encoder's internal buffer.
   */
  encodeSharedRef(object) {
    if (this.entered) {
      const instance = this.clone();
      return instance.encodeSharedRef(object);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.doEncode(object, 1);
      return this.bytes.subarray(0, this.pos);
    } finally {
      this.entered = false;
    }
  }
  /**
   * @returns Encodes the object and returns a copy of the encoder's internal buffer.
   */
  encode(object) {
    if (this.entered) {
      const instance = this.clone();
      return instance.encode(object);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.doEncode(object, 1);
      return this.bytes.slice(0, this.pos);
    } finally {
      this.entered = false;
    }
  }
  doEncode(object, depth) {
    if (depth > this.maxDepth) {
      throw new Error(`Too deep objects in depth ${depth}`);
    }
    if (object == null) {
      this.encodeNil();
    } else if (typeof object === "boolean") {
      this.encodeBoolean(object);
    } else if (typeof object === "number") {
      if (!this.forceIntegerToFloat) {
        this.encodeNumber(object);
      } else {
        this.encodeNumberAsFloat(object);
      }
    } else if (typeof object === "string") {
      this.encodeString(object);
    } else if (this.useBigInt64 && typeof object === "bigint") {
      this.encodeBigInt64(object);
    } else {
      this.encodeObject(object, depth);
    }
  }
  ensureBufferSizeToWrite(sizeToWrite) {
    const requiredSize = this.pos + sizeToWrite;
    if (this.view.byteLength < requiredSize) {
      this.resizeBuffer(requiredSize * 2);
    }
  }
  resizeBuffer(newSize) {
    const newBuffer = new ArrayBuffer(newSize);
    const newBytes = new Uint8Array(newBuffer);
    const newView = new DataView(newBuffer);
    newBytes.set(this.bytes);
    this.view = newView;
    this.bytes = newBytes;
  }
  encodeNil() {
    this.writeU8(192);
  }
  encodeBoolean(object) {
    if (object === false) {
      this.writeU8(194);
    } else {
      this.writeU8(195);
    }
  }
  encodeNumber(object) {
    if (!this.forceIntegerToFloat && Number.isSafeInteger(object)) {
      if (object >= 0) {
        if (object < 128) {
          this.writeU8(object);
        } else if (object < 256) {
          this.writeU8(204);
          this.writeU8(object);
        } else if (object < 65536) {
          this.writeU8(205);
          this.writeU16(object);
        } else if (object < 4294967296) {
          this.writeU8(206);
          this.writeU32(object);
        } else if (!this.useBigInt64) {
          this.writeU8(207);
          this.writeU64(object);
        } else {
          this.encodeNumberAsFloat(object);
        }
      } else {
        if (object >= -32) {
          this.writeU8(224 | object + 32);
        } else if (object >= -128) {
          this.writeU8(208);
          this.writeI8(object);
        } else if (object >= -32768) {
          this.writeU8(209);
          this.writeI16(object);
        } else if (object >= -2147483648) {
          this.writeU8(210);
          this.writeI32(object);
        } else if (!this.useBigInt64) {
          this.writeU8(211);
          this.writeI64(object);
        } else {
          this.encodeNumberAsFloat(object);
        }
      }
    } else {
      this.encodeNumberAsFloat(object);
    }
  }
  encodeNumberAsFloat(object) {
    if (this.forceFloat32) {
      this.writeU8(202);
      this.writeF32(object);
    } else {
      this.writeU8(203);
      this.writeF64(object);
    }
  }
  encodeBigInt64(object) {
    if (object >= BigInt(0)) {
      this.writeU8(207);
      this.writeBigUint64(object);
    } else {
      this.writeU8(211);
      this.writeBigInt64(object);
    }
  }
  writeStringHeader(byteLength) {
    if (byteLength < 32) {
      this.writeU8(160 + byteLength);
    } else if (byteLength < 256) {
      this.writeU8(217);
      this.writeU8(byteLength);
    } else if (byteLength < 65536) {
      this.writeU8(218);
      this.writeU16(byteLength);
    } else if (byteLength < 4294967296) {
      this.writeU8(219);
      this.writeU32(byteLength);
    } else {
      throw new Error(`Too long string: ${byteLength} bytes in UTF-8`);
    }
  }
  encodeString(object) {
    const maxHeaderSize = 1 + 4;
    const byteLength = utf8Count(object);
    this.ensureBufferSizeToWrite(maxHeaderSize + byteLength);
    this.writeStringHeader(byteLength);
    utf8Encode(object, this.bytes, this.pos);
    this.pos += byteLength;
  }
  encodeObject(object, depth) {
    const ext = this.extensionCodec.tryToEncode(object, this.context);
    if (ext != null) {
      this.encodeExtension(ext);
    } else if (Array.isArray(object)) {
      this.encodeArray(object, depth);
    } else if (ArrayBuffer.isView(object)) {
      this.encodeBinary(object);
    } else if (typeof object === "object") {
      this.encodeMap(object, depth);
    } else {
      throw new Error(`Unrecognized object: ${Object.prototype.toString.apply(object)}`);
    }
  }
  encodeBinary(object) {
    const size = object.byteLength;
    if (size < 256) {
      this.writeU8(196);
      this.writeU8(size);
    } else if (size < 65536) {
      this.writeU8(197);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(198);
      this.writeU32(size);
    } else {
      throw new Error(`Too large binary: ${size}`);
    }
    const bytes = ensureUint8Array(object);
    this.writeU8a(bytes);
  }
  encodeArray(object, depth) {
    const size = object.length;
    if (size < 16) {
      this.writeU8(144 + size);
    } else if (size < 65536) {
      this.writeU8(220);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(221);
      this.writeU32(size);
    } else {
      throw new Error(`Too large array: ${size}`);
    }
    for (const item of object) {
      this.doEncode(item, depth + 1);
    }
  }
  countWithoutUndefined(object, keys) {
    let count = 0;
    for (const key of keys) {
      if (object[key] !== void 0) {
        count++;
      }
    }
    return count;
  }
  encodeMap(object, depth) {
    const keys = Object.keys(object);
    if (this.sortKeys) {
      keys.sort();
    }
    const size = this.ignoreUndefined ? this.countWithoutUndefined(object, keys) : keys.length;
    if (size < 16) {
      this.writeU8(128 + size);
    } else if (size < 65536) {
      this.writeU8(222);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(223);
      this.writeU32(size);
    } else {
      throw new Error(`Too large map object: ${size}`);
    }
    for (const key of keys) {
      const value = object[key];
      if (!(this.ignoreUndefined && value === void 0)) {
        this.encodeString(key);
        this.doEncode(value, depth + 1);
      }
    }
  }
  encodeExtension(ext) {
    if (typeof ext.data === "function") {
      const data = ext.data(this.pos + 6);
      const size2 = data.length;
      if (size2 >= 4294967296) {
        throw new Error(`Too large extension object: ${size2}`);
      }
      this.writeU8(201);
      this.writeU32(size2);
      this.writeI8(ext.type);
      this.writeU8a(data);
      return;
    }
    const size = ext.data.length;
    if (size === 1) {
      this.writeU8(212);
    } else if (size === 2) {
      this.writeU8(213);
    } else if (size === 4) {
      this.writeU8(214);
    } else if (size === 8) {
      this.writeU8(215);
    } else if (size === 16) {
      this.writeU8(216);
    } else if (size < 256) {
      this.writeU8(199);
      this.writeU8(size);
    } else if (size < 65536) {
      this.writeU8(200);
      this.writeU16(size);
    } else if (size < 4294967296) {
      this.writeU8(201);
      this.writeU32(size);
    } else {
      throw new Error(`Too large extension object: ${size}`);
    }
    this.writeI8(ext.type);
    this.writeU8a(ext.data);
  }
  writeU8(value) {
    this.ensureBufferSizeToWrite(1);
    this.view.setUint8(this.pos, value);
    this.pos++;
  }
  writeU8a(values) {
    const size = values.length;
    this.ensureBufferSizeToWrite(size);
    this.bytes.set(values, this.pos);
    this.pos += size;
  }
  writeI8(value) {
    this.ensureBufferSizeToWrite(1);
    this.view.setInt8(this.pos, value);
    this.pos++;
  }
  writeU16(value) {
    this.ensureBufferSizeToWrite(2);
    this.view.setUint16(this.pos, value);
    this.pos += 2;
  }
  writeI16(value) {
    this.ensureBufferSizeToWrite(2);
    this.view.setInt16(this.pos, value);
    this.pos += 2;
  }
  writeU32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setUint32(this.pos, value);
    this.pos += 4;
  }
  writeI32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setInt32(this.pos, value);
    this.pos += 4;
  }
  writeF32(value) {
    this.ensureBufferSizeToWrite(4);
    this.view.setFloat32(this.pos, value);
    this.pos += 4;
  }
  writeF64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setFloat64(this.pos, value);
    this.pos += 8;
  }
  writeU64(value) {
    this.ensureBufferSizeToWrite(8);
    setUint64(this.view, this.pos, value);
    this.pos += 8;
  }
  writeI64(value) {
    this.ensureBufferSizeToWrite(8);
    setInt64(this.view, this.pos, value);
    this.pos += 8;
  }
  writeBigUint64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setBigUint64(this.pos, value);
    this.pos += 8;
  }
  writeBigInt64(value) {
    this.ensureBufferSizeToWrite(8);
    this.view.setBigInt64(this.pos, value);
    this.pos += 8;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/utils/prettyByte.mjs
function prettyByte(byte) {
  return `${byte < 0 ? "-" : ""}0x${Math.abs(byte).toString(16).padStart(2, "0")}`;
}

// node_modules/@msgpack/msgpack/dist.esm/CachedKeyDecoder.mjs
var DEFAULT_MAX_KEY_LENGTH = 16;
var DEFAULT_MAX_LENGTH_PER_KEY = 16;
var CachedKeyDecoder = class {
  hit = 0;
  miss = 0;
  caches;
  maxKeyLength;
  maxLengthPerKey;
  constructor(maxKeyLength = DEFAULT_MAX_KEY_LENGTH, maxLengthPerKey = DEFAULT_MAX_LENGTH_PER_KEY) {
    this.maxKeyLength = maxKeyLength;
    this.maxLengthPerKey = maxLengthPerKey;
    this.caches = [];
    for (let i = 0; i < this.maxKeyLength; i++) {
      this.caches.push([]);
    }
  }
  canBeCached(byteLength) {
    return byteLength > 0 && byteLength <= this.maxKeyLength;
  }
  find(bytes, inputOffset, byteLength) {
    const records = this.caches[byteLength - 1];
    FIND_CHUNK: for (const record2 of records) {
      const recordBytes = record2.bytes;
      for (let j = 0; j < byteLength; j++) {
        if (recordBytes[j] !== bytes[inputOffset + j]) {
          continue FIND_CHUNK;
        }
      }
      return record2.str;
    }
    return null;
  }
  store(bytes, value) {
    const records = this.caches[bytes.length - 1];
    const record2 = { bytes, str: value };
    if (records.length >= this.maxLengthPerKey) {
      records[Math.random() * records.length | 0] = record2;
    } else {
      records.push(record2);
    }
  }
  decode(bytes, inputOffset, byteLength) {
    const cachedValue = this.find(bytes, inputOffset, byteLength);
    if (cachedValue != null) {
      this.hit++;
      return cachedValue;
    }
    this.miss++;
    const str = utf8DecodeJs(bytes, inputOffset, byteLength);
    const slicedCopyOfBytes = Uint8Array.prototype.slice.call(bytes, inputOffset, inputOffset + byteLength);
    this.store(slicedCopyOfBytes, str);
    return str;
  }
};

// node_modules/@msgpack/msgpack/dist.esm/Decoder.mjs
var STATE_ARRAY = "array";
var STATE_MAP_KEY = "map_key";
var STATE_MAP_VALUE = "map_value";
var mapKeyConverter = (key) => {
  if (typeof key === "string" || typeof key === "number") {
    return key;
  }
  throw new DecodeError("The type of key must be string or number but " + typeof key);
};
var StackPool = class {
  stack = [];
  stackHeadPosition = -1;
  get length() {
    return this.stackHeadPosition + 1;
  }
  top() {
    return this.stack[this.stackHeadPosition];
  }
  pushArrayState(size) {
    const state2 = this.getUninitializedStateFromPool();
    state2.type = STATE_ARRAY;
    state2.position = 0;
    state2.size = size;
    state2.array = new Array(size);
  }
  pushMapState(size) {
    const state2 = this.getUninitializedStateFromPool();
    state2.type = STATE_MAP_KEY;
    state2.readCount = 0;
    state2.size = size;
    state2.map = {};
  }
  getUninitializedStateFromPool() {
    this.stackHeadPosition++;
    if (this.stackHeadPosition === this.stack.length) {
      const partialState = {
        type: void 0,
        size: 0,
        array: void 0,
        position: 0,
        readCount: 0,
        map: void 0,
        key: null
      };
      this.stack.push(partialState);
    }
    return this.stack[this.stackHeadPosition];
  }
  release(state2) {
    const topStackState = this.stack[this.stackHeadPosition];
    if (topStackState !== state2) {
      throw new Error("Invalid stack state. Released state is not on top of the stack.");
    }
    if (state2.type === STATE_ARRAY) {
      const partialState = state2;
      partialState.size = 0;
      partialState.array = void 0;
      partialState.position = 0;
      partialState.type = void 0;
    }
    if (state2.type === STATE_MAP_KEY || state2.type === STATE_MAP_VALUE) {
      const partialState = state2;
      partialState.size = 0;
      partialState.map = void 0;
      partialState.readCount = 0;
      partialState.type = void 0;
    }
    this.stackHeadPosition--;
  }
  reset() {
    this.stack.length = 0;
    this.stackHeadPosition = -1;
  }
};
var HEAD_BYTE_REQUIRED = -1;
var EMPTY_VIEW = new DataView(new ArrayBuffer(0));
var EMPTY_BYTES = new Uint8Array(EMPTY_VIEW.buffer);
try {
  EMPTY_VIEW.getInt8(0);
} catch (e) {
  if (!(e instanceof RangeError)) {
    throw new Error("This module is not supported in the current JavaScript engine because DataView does not throw RangeError on out-of-bounds access");
  }
}
var MORE_DATA = new RangeError("Insufficient data");
var sharedCachedKeyDecoder = new CachedKeyDecoder();
var Decoder = class _Decoder {
  extensionCodec;
  context;
  useBigInt64;
  rawStrings;
  maxStrLength;
  maxBinLength;
  maxArrayLength;
  maxMapLength;
  maxExtLength;
  keyDecoder;
  mapKeyConverter;
  totalPos = 0;
  pos = 0;
  view = EMPTY_VIEW;
  bytes = EMPTY_BYTES;
  headByte = HEAD_BYTE_REQUIRED;
  stack = new StackPool();
  entered = false;
  constructor(options) {
    this.extensionCodec = options?.extensionCodec ?? ExtensionCodec.defaultCodec;
    this.context = options?.context;
    this.useBigInt64 = options?.useBigInt64 ?? false;
    this.rawStrings = options?.rawStrings ?? false;
    this.maxStrLength = options?.maxStrLength ?? UINT32_MAX;
    this.maxBinLength = options?.maxBinLength ?? UINT32_MAX;
    this.maxArrayLength = options?.maxArrayLength ?? UINT32_MAX;
    this.maxMapLength = options?.maxMapLength ?? UINT32_MAX;
    this.maxExtLength = options?.maxExtLength ?? UINT32_MAX;
    this.keyDecoder = options?.keyDecoder !== void 0 ? options.keyDecoder : sharedCachedKeyDecoder;
    this.mapKeyConverter = options?.mapKeyConverter ?? mapKeyConverter;
  }
  clone() {
    return new _Decoder({
      extensionCodec: this.extensionCodec,
      context: this.context,
      useBigInt64: this.useBigInt64,
      rawStrings: this.rawStrings,
      maxStrLength: this.maxStrLength,
      maxBinLength: this.maxBinLength,
      maxArrayLength: this.maxArrayLength,
      maxMapLength: this.maxMapLength,
      maxExtLength: this.maxExtLength,
      keyDecoder: this.keyDecoder
    });
  }
  reinitializeState() {
    this.totalPos = 0;
    this.headByte = HEAD_BYTE_REQUIRED;
    this.stack.reset();
  }
  setBuffer(buffer) {
    const bytes = ensureUint8Array(buffer);
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  appendBuffer(buffer) {
    if (this.headByte === HEAD_BYTE_REQUIRED && !this.hasRemaining(1)) {
      this.setBuffer(buffer);
    } else {
      const remainingData = this.bytes.subarray(this.pos);
      const newData = ensureUint8Array(buffer);
      const newBuffer = new Uint8Array(remainingData.length + newData.length);
      newBuffer.set(remainingData);
      newBuffer.set(newData, remainingData.length);
      this.setBuffer(newBuffer);
    }
  }
  hasRemaining(size) {
    return this.view.byteLength - this.pos >= size;
  }
  createExtraByteError(posToShow) {
    const { view, pos } = this;
    return new RangeError(`Extra ${view.byteLength - pos} of ${view.byteLength} byte(s) found at buffer[${posToShow}]`);
  }
  /**
   * @throws {@link DecodeError}
   * @throws {@link RangeError}
   */
  decode(buffer) {
    if (this.entered) {
      const instance = this.clone();
      return instance.decode(buffer);
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.setBuffer(buffer);
      const object = this.doDecodeSync();
      if (this.hasRemaining(1)) {
        throw this.createExtraByteError(this.pos);
      }
      return object;
    } finally {
      this.entered = false;
    }
  }
  *decodeMulti(buffer) {
    if (this.entered) {
      const instance = this.clone();
      yield* instance.decodeMulti(buffer);
      return;
    }
    try {
      this.entered = true;
      this.reinitializeState();
      this.setBuffer(buffer);
      while (this.hasRemaining(1)) {
        yield this.doDecodeSync();
      }
    } finally {
      this.entered = false;
    }
  }
  async decodeAsync(stream) {
    if (this.entered) {
      const instance = this.clone();
      return instance.decodeAsync(stream);
    }
    try {
      this.entered = true;
      let decoded = false;
      let object;
      for await (const buffer of stream) {
        if (decoded) {
          this.entered = false;
          throw this.createExtraByteError(this.totalPos);
        }
        this.appendBuffer(buffer);
        try {
          object = this.doDecodeSync();
          decoded = true;
        } catch (e) {
          if (!(e instanceof RangeError)) {
            throw e;
          }
        }
        this.totalPos += this.pos;
      }
      if (decoded) {
        if (this.hasRemaining(1)) {
          throw this.createExtraByteError(this.totalPos);
        }
        return object;
      }
      const { headByte, pos, totalPos } = this;
      throw new RangeError(`Insufficient data in parsing ${prettyByte(headByte)} at ${totalPos} (${pos} in the current buffer)`);
    } finally {
      this.entered = false;
    }
  }
  decodeArrayStream(stream) {
    return this.decodeMultiAsync(stream, true);
  }
  decodeStream(stream) {
    return this.decodeMultiAsync(stream, false);
  }
  async *decodeMultiAsync(stream, isArray) {
    if (this.entered) {
      const instance = this.clone();
      yield* instance.decodeMultiAsync(stream, isArray);
      return;
    }
    try {
      this.entered = true;
      let isArrayHeaderRequired = isArray;
      let arrayItemsLeft = -1;
      for await (const buffer of stream) {
        if (isArray && arrayItemsLeft === 0) {
          throw this.createExtraByteError(this.totalPos);
        }
        this.appendBuffer(buffer);
        if (isArrayHeaderRequired) {
          arrayItemsLeft = this.readArraySize();
          isArrayHeaderRequired = false;
          this.complete();
        }
        try {
          while (true) {
            yield this.doDecodeSync();
            if (--arrayItemsLeft === 0) {
              break;
            }
          }
        } catch (e) {
          if (!(e instanceof RangeError)) {
            throw e;
          }
        }
        this.totalPos += this.pos;
      }
    } finally {
      this.entered = false;
    }
  }
  doDecodeSync() {
    DECODE: while (true) {
      const headByte = this.readHeadByte();
      let object;
      if (headByte >= 224) {
        object = headByte - 256;
      } else if (headByte < 192) {
        if (headByte < 128) {
          object = headByte;
        } else if (headByte < 144) {
          const size = headByte - 128;
          if (size !== 0) {
            this.pushMapState(size);
            this.complete();
            continue DECODE;
          } else {
            object = {};
          }
        } else if (headByte < 160) {
          const size = headByte - 144;
          if (size !== 0) {
            this.pushArrayState(size);
            this.complete();
            continue DECODE;
          } else {
            object = [];
          }
        } else {
          const byteLength = headByte - 160;
          object = this.decodeString(byteLength, 0);
        }
      } else if (headByte === 192) {
        object = null;
      } else if (headByte === 194) {
        object = false;
      } else if (headByte === 195) {
        object = true;
      } else if (headByte === 202) {
        object = this.readF32();
      } else if (headByte === 203) {
        object = this.readF64();
      } else if (headByte === 204) {
        object = this.readU8();
      } else if (headByte === 205) {
        object = this.readU16();
      } else if (headByte === 206) {
        object = this.readU32();
      } else if (headByte === 207) {
        if (this.useBigInt64) {
          object = this.readU64AsBigInt();
        } else {
          object = this.readU64();
        }
      } else if (headByte === 208) {
        object = this.readI8();
      } else if (headByte === 209) {
        object = this.readI16();
      } else if (headByte === 210) {
        object = this.readI32();
      } else if (headByte === 211) {
        if (this.useBigInt64) {
          object = this.readI64AsBigInt();
        } else {
          object = this.readI64();
        }
      } else if (headByte === 217) {
        const byteLength = this.lookU8();
        object = this.decodeString(byteLength, 1);
      } else if (headByte === 218) {
        const byteLength = this.lookU16();
        object = this.decodeString(byteLength, 2);
      } else if (headByte === 219) {
        const byteLength = this.lookU32();
        object = this.decodeString(byteLength, 4);
      } else if (headByte === 220) {
        const size = this.readU16();
        if (size !== 0) {
          this.pushArrayState(size);
          this.complete();
          continue DECODE;
        } else {
          object = [];
        }
      } else if (headByte === 221) {
        const size = this.readU32();
        if (size !== 0) {
          this.pushArrayState(size);
          this.complete();
          continue DECODE;
        } else {
          object = [];
        }
      } else if (headByte === 222) {
        const size = this.readU16();
        if (size !== 0) {
          this.pushMapState(size);
          this.complete();
          continue DECODE;
        } else {
          object = {};
        }
      } else if (headByte === 223) {
        const size = this.readU32();
        if (size !== 0) {
          this.pushMapState(size);
          this.complete();
          continue DECODE;
        } else {
          object = {};
        }
      } else if (headByte === 196) {
        const size = this.lookU8();
        object = this.decodeBinary(size, 1);
      } else if (headByte === 197) {
        const size = this.lookU16();
        object = this.decodeBinary(size, 2);
      } else if (headByte === 198) {
        const size = this.lookU32();
        object = this.decodeBinary(size, 4);
      } else if (headByte === 212) {
        object = this.decodeExtension(1, 0);
      } else if (headByte === 213) {
        object = this.decodeExtension(2, 0);
      } else if (headByte === 214) {
        object = this.decodeExtension(4, 0);
      } else if (headByte === 215) {
        object = this.decodeExtension(8, 0);
      } else if (headByte === 216) {
        object = this.decodeExtension(16, 0);
      } else if (headByte === 199) {
        const size = this.lookU8();
        object = this.decodeExtension(size, 1);
      } else if (headByte === 200) {
        const size = this.lookU16();
        object = this.decodeExtension(size, 2);
      } else if (headByte === 201) {
        const size = this.lookU32();
        object = this.decodeExtension(size, 4);
      } else {
        throw new DecodeError(`Unrecognized type byte: ${prettyByte(headByte)}`);
      }
      this.complete();
      const stack = this.stack;
      while (stack.length > 0) {
        const state2 = stack.top();
        if (state2.type === STATE_ARRAY) {
          state2.array[state2.position] = object;
          state2.position++;
          if (state2.position === state2.size) {
            object = state2.array;
            stack.release(state2);
          } else {
            continue DECODE;
          }
        } else if (state2.type === STATE_MAP_KEY) {
          if (object === "__proto__") {
            throw new DecodeError("The key __proto__ is not allowed");
          }
          state2.key = this.mapKeyConverter(object);
          state2.type = STATE_MAP_VALUE;
          continue DECODE;
        } else {
          state2.map[state2.key] = object;
          state2.readCount++;
          if (state2.readCount === state2.size) {
            object = state2.map;
            stack.release(state2);
          } else {
            state2.key = null;
            state2.type = STATE_MAP_KEY;
            continue DECODE;
          }
        }
      }
      return object;
    }
  }
  readHeadByte() {
    if (this.headByte === HEAD_BYTE_REQUIRED) {
      this.headByte = this.readU8();
    }
    return this.headByte;
  }
  complete() {
    this.headByte = HEAD_BYTE_REQUIRED;
  }
  readArraySize() {
    const headByte = this.readHeadByte();
    switch (headByte) {
      case 220:
        return this.readU16();
      case 221:
        return this.readU32();
      default: {
        if (headByte < 160) {
          return headByte - 144;
        } else {
          throw new DecodeError(`Unrecognized array type byte: ${prettyByte(headByte)}`);
        }
      }
    }
  }
  pushMapState(size) {
    if (size > this.maxMapLength) {
      throw new DecodeError(`Max length exceeded: map length (${size}) > maxMapLengthLength (${this.maxMapLength})`);
    }
    this.stack.pushMapState(size);
  }
  pushArrayState(size) {
    if (size > this.maxArrayLength) {
      throw new DecodeError(`Max length exceeded: array length (${size}) > maxArrayLength (${this.maxArrayLength})`);
    }
    this.stack.pushArrayState(size);
  }
  decodeString(byteLength, headerOffset) {
    if (!this.rawStrings || this.stateIsMapKey()) {
      return this.decodeUtf8String(byteLength, headerOffset);
    }
    return this.decodeBinary(byteLength, headerOffset);
  }
  /**
   * @throws {@link RangeError}
   */
  decodeUtf8String(byteLength, headerOffset) {
    if (byteLength > this.maxStrLength) {
      throw new DecodeError(`Max length exceeded: UTF-8 byte length (${byteLength}) > maxStrLength (${this.maxStrLength})`);
    }
    if (this.bytes.byteLength < this.pos + headerOffset + byteLength) {
      throw MORE_DATA;
    }
    const offset = this.pos + headerOffset;
    let object;
    if (this.stateIsMapKey() && this.keyDecoder?.canBeCached(byteLength)) {
      object = this.keyDecoder.decode(this.bytes, offset, byteLength);
    } else {
      object = utf8Decode(this.bytes, offset, byteLength);
    }
    this.pos += headerOffset + byteLength;
    return object;
  }
  stateIsMapKey() {
    if (this.stack.length > 0) {
      const state2 = this.stack.top();
      return state2.type === STATE_MAP_KEY;
    }
    return false;
  }
  /**
   * @throws {@link RangeError}
   */
  decodeBinary(byteLength, headOffset) {
    if (byteLength > this.maxBinLength) {
      throw new DecodeError(`Max length exceeded: bin length (${byteLength}) > maxBinLength (${this.maxBinLength})`);
    }
    if (!this.hasRemaining(byteLength + headOffset)) {
      throw MORE_DATA;
    }
    const offset = this.pos + headOffset;
    const object = this.bytes.subarray(offset, offset + byteLength);
    this.pos += headOffset + byteLength;
    return object;
  }
  decodeExtension(size, headOffset) {
    if (size > this.maxExtLength) {
      throw new DecodeError(`Max length exceeded: ext length (${size}) > maxExtLength (${this.maxExtLength})`);
    }
    const extType = this.view.getInt8(this.pos + headOffset);
    const data = this.decodeBinary(
      size,
      headOffset + 1
      /* extType */
    );
    return this.extensionCodec.decode(data, extType, this.context);
  }
  lookU8() {
    return this.view.getUint8(this.pos);
  }
  lookU16() {
    return this.view.getUint16(this.pos);
  }
  lookU32() {
    return this.view.getUint32(this.pos);
  }
  readU8() {
    const value = this.view.getUint8(this.pos);
    this.pos++;
    return value;
  }
  readI8() {
    const value = this.view.getInt8(this.pos);
    this.pos++;
    return value;
  }
  readU16() {
    const value = this.view.getUint16(this.pos);
    this.pos += 2;
    return value;
  }
  readI16() {
    const value = this.view.getInt16(this.pos);
    this.pos += 2;
    return value;
  }
  readU32() {
    const value = this.view.getUint32(this.pos);
    this.pos += 4;
    return value;
  }
  readI32() {
    const value = this.view.getInt32(this.pos);
    this.pos += 4;
    return value;
  }
  readU64() {
    const value = getUint64(this.view, this.pos);
    this.pos += 8;
    return value;
  }
  readI64() {
    const value = getInt64(this.view, this.pos);
    this.pos += 8;
    return value;
  }
  readU64AsBigInt() {
    const value = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return value;
  }
  readI64AsBigInt() {
    const value = this.view.getBigInt64(this.pos);
    this.pos += 8;
    return value;
  }
  readF32() {
    const value = this.view.getFloat32(this.pos);
    this.pos += 4;
    return value;
  }
  readF64() {
    const value = this.view.getFloat64(this.pos);
    this.pos += 8;
    return value;
  }
};

// src/codec.js
var PROTOCOL_VERSION = 1;
var MsgType = Object.freeze({
  WELCOME: 0,
  EVENT: 1,
  STATE: 2,
  DIRECT: 3,
  JOIN: 5,
  LEAVE: 6,
  ERROR: 7,
  DROPPED: 8,
  PING: 9,
  PONG: 9
});
var CloseCode = Object.freeze({
  NORMAL: 1e3,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  // no close frame: the connection just broke (browser-side code)
  TEXT_FRAME: 1003,
  TOO_MANY_ERRORS: 1008,
  FRAME_TOO_LARGE: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  AT_CAPACITY: 1013,
  BAD_TOKEN: 4001,
  ROOM_FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008,
  ROOM_FULL: 4009,
  RATE_LIMITED: 4029,
  BAD_REQUEST: 4400,
  REPLACED: 4409
});
var FINAL_CLOSE_CODES = /* @__PURE__ */ new Set([1e3, 1003, 1008, 1009, 4001, 4003, 4009, 4400, 4409]);
function shouldReconnect(code) {
  return !FINAL_CLOSE_CODES.has(code);
}
var RESUMABLE_CLOSE_CODES = /* @__PURE__ */ new Set([1001, 1006, 1011, 1012, 1013, 4008]);
var event = (seq, data) => [MsgType.EVENT, seq, data];
var state = (seq, key, data) => [MsgType.STATE, seq, key, data];
var direct = (seq, toActor, data) => [MsgType.DIRECT, seq, toActor, data];
var ping = (clientTime) => [MsgType.PING, clientTime];
var encoder = new Encoder({ ignoreUndefined: true });
function encodeMessage(message) {
  return encoder.encode(message);
}
function packFrames(encoded, maxFrameBytes = Infinity) {
  const frames = [];
  let batch = [];
  let size = 0;
  const flush = () => {
    if (batch.length === 0) return;
    const frame = new Uint8Array(size);
    let at = 0;
    for (const part of batch) {
      frame.set(part, at);
      at += part.length;
    }
    frames.push(frame);
    batch = [];
    size = 0;
  };
  for (const part of encoded) {
    if (size > 0 && size + part.length > maxFrameBytes) flush();
    batch.push(part);
    size += part.length;
  }
  flush();
  return frames;
}
function encodeFrames(messages, maxFrameBytes) {
  return packFrames(messages.map(encodeMessage), maxFrameBytes);
}
var PROTO_KEY = "\uFFFD__proto__";
var utf8 = new TextDecoder();
var keyDecoder = {
  canBeCached: (n) => n === 9,
  decode(bytes, at, n) {
    const key = utf8.decode(bytes.subarray(at, at + n));
    return key === "__proto__" ? PROTO_KEY : key;
  }
};
var decoder = new Decoder({ keyDecoder });
function record(value) {
  const out = /* @__PURE__ */ Object.create(null);
  if (value && typeof value === "object") Object.assign(out, value);
  return out;
}
function decodeSnapshot(raw) {
  const snapshot = /* @__PURE__ */ new Map();
  const entries = raw instanceof Map ? raw.entries() : Object.entries(raw ?? {});
  for (const [actor, values] of entries) snapshot.set(Number(actor), record(values));
  return snapshot;
}
var member = (m) => ({ actor: m[0], player: m[1], meta: m[2] ?? {} });
function parseMessage(m) {
  if (!Array.isArray(m) || typeof m[0] !== "number") return null;
  switch (m[0]) {
    case MsgType.WELCOME:
      return {
        type: "welcome",
        version: m[1],
        actor: m[2],
        room: m[3],
        members: (m[4] ?? []).map(member),
        snapshot: decodeSnapshot(m[5]),
        serverTime: m[6],
        limits: m[7] ?? {},
        offset: m[8],
        epoch: m[9],
        resumeToken: m[10],
        lastSeq: m[11] ?? null
      };
    case MsgType.EVENT:
      return { type: "event", from: m[1], seq: m[2], data: m[3], offset: m[4] };
    case MsgType.STATE:
      return { type: "state", from: m[1], key: m[2], data: m[3], offset: m[4] };
    case MsgType.DIRECT:
      return { type: "direct", from: m[1], seq: m[2], data: m[3] };
    case MsgType.JOIN:
      return { type: "join", actor: m[1], player: m[2], meta: m[3] ?? {}, offset: m[4] };
    case MsgType.LEAVE:
      return { type: "leave", actor: m[1], code: m[2], offset: m[3] };
    case MsgType.ERROR:
      return { type: "error", seq: m[1] ?? null, code: m[2], message: m[3] };
    case MsgType.DROPPED:
      return { type: "dropped", count: m[1] };
    case MsgType.PONG:
      return { type: "pong", clientTime: m[1], serverTime: m[2] };
    default:
      return null;
  }
}
function decodeFrame(frame) {
  const out = [];
  for (const value of decoder.decodeMulti(frame)) {
    const message = parseMessage(value);
    if (message) out.push(message);
  }
  return out;
}

// src/room.js
var RoomView = class {
  constructor() {
    this.actor = null;
    this.room = null;
    this.members = /* @__PURE__ */ new Map();
    this.snapshot = /* @__PURE__ */ new Map();
    this.offset = null;
    this.epoch = null;
  }
  /** Start over from a WELCOME: everything before it is replaced. */
  reset(welcome) {
    this.actor = welcome.actor;
    this.room = welcome.room;
    this.members = new Map(welcome.members.map((m) => [m.actor, m]));
    this.snapshot = welcome.snapshot;
    this.offset = welcome.offset;
    this.epoch = welcome.epoch;
  }
  /**
   * Apply one room-ordered message (JOIN, LEAVE, STATE, EVENT); others pass.
   * Returns what the message changed, for the callbacks: the member that
   * joined or left, or the previous value of a STATE key.
   * @param {ServerMessage} msg
   */
  apply(msg) {
    if ("offset" in msg && typeof msg.offset === "number") this.offset = msg.offset;
    switch (msg.type) {
      case "join": {
        const joined = { actor: msg.actor, player: msg.player, meta: msg.meta };
        this.members.set(msg.actor, joined);
        return joined;
      }
      case "leave": {
        const left = this.members.get(msg.actor);
        this.members.delete(msg.actor);
        this.snapshot.delete(msg.actor);
        return left;
      }
      case "state":
        return this.setState(msg.from, msg.key, msg.data);
      default:
        return void 0;
    }
  }
  /**
   * Set (or with data null, delete) one STATE key of an actor.
   * @param {number} actor @param {string|number} key @param {any} data
   * @returns {any} the previous value
   */
  setState(actor, key, data) {
    const values = this.snapshot.get(actor);
    const previous = values?.[key];
    if (data === null || data === void 0) {
      if (values) {
        delete values[key];
        if (Object.keys(values).length === 0) this.snapshot.delete(actor);
      }
    } else if (values) {
      values[key] = data;
    } else {
      this.snapshot.set(actor, Object.assign(/* @__PURE__ */ Object.create(null), { [key]: data }));
    }
    return previous;
  }
};

// src/client.js
var ROOM_ID = /^[A-Za-z0-9_.:-]{1,64}$/;
var RESEND_BUFFER = 1024;
var ERROR_GRACE_MS = 250;
var RelayError = class extends Error {
  /** @param {string} message @param {number} [code] @param {string} [reason] */
  constructor(message, code, reason = "") {
    super(message);
    this.name = "RelayError";
    this.code = code;
    this.reason = reason;
  }
};
async function connect(options) {
  const client = new RelayClient(options);
  await client.ready;
  return client;
}
function socketUrl(o) {
  if (!ROOM_ID.test(o.room ?? "")) {
    throw new TypeError(
      `room must be 1-64 characters from A-Z a-z 0-9 _ . : -, not ${JSON.stringify(o.room)}`
    );
  }
  const origin = o.url ?? globalThis.location?.origin;
  if (!origin)
    throw new TypeError("url is required outside a page served by the relay (e.g. in Node)");
  const url = new URL(origin);
  url.protocol = url.protocol.replace(/^http/, "ws");
  url.pathname = `${url.pathname.replace(/\/$/, "")}/ws/${o.room}`;
  url.search = "";
  if (typeof o.token === "string" && o.token) url.searchParams.set("token", o.token);
  if (o.player) url.searchParams.set("player", o.player);
  if (o.name) url.searchParams.set("name", o.name);
  if (o.echo) url.searchParams.set("echo", "1");
  return url.href;
}
var RelayClient = class {
  /** @param {ConnectOptions} options */
  constructor(options) {
    this.options = { reconnect: true, backoffMs: 250, maxBackoffMs: 8e3, ...options };
    if (typeof (this.options.WebSocket ?? globalThis.WebSocket) !== "function")
      throw new TypeError(
        "no WebSocket here: pass options.WebSocket, or use Node 22+ (Node 20: --experimental-websocket)"
      );
    const bases = this.options.urls?.length ? this.options.urls : [this.options.url];
    this.urls = bases.map((url) => socketUrl({ ...this.options, url }));
    this._at = 0;
    this._firstTries = 1;
    this.status = "connecting";
    this.view = new RoomView();
    this.droppedTotal = 0;
    this.limits = {};
    this._seq = 0;
    this._wiredSeq = 0;
    this._sent = [];
    this._pending = [];
    this._resumeToken = null;
    this._resumeFrom = null;
    this._flushQueued = false;
    this._pings = /* @__PURE__ */ new Map();
    this._handlers = /* @__PURE__ */ new Map();
    this._attempt = 0;
    this._welcomed = false;
    this._closedByUser = false;
    this._timer = void 0;
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {
    });
    this._open();
  }
  /** The room's socket URL on the node in use. */
  get url() {
    return this.urls[this._at];
  }
  /** This player's actor in the room (it may change after a reconnect). */
  get actor() {
    return this.view.actor;
  }
  get room() {
    return this.view.room;
  }
  /** actor -> {actor, player, meta}, this player included. */
  get members() {
    return this.view.members;
  }
  /** actor -> {key: data}: every member's latest STATE values. */
  get snapshot() {
    return this.view.snapshot;
  }
  /** The last room offset seen. */
  get offset() {
    return this.view.offset;
  }
  /**
   * Call fn for every message or change of the given kind; returns a function that unsubscribes.
   * @template {keyof ClientEvents} K
   * @param {K} type @param {(e: ClientEvents[K]) => void} fn
   */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, /* @__PURE__ */ new Set());
    this._handlers.get(type)?.add(fn);
    return () => this.off(type, fn);
  }
  /** @template {keyof ClientEvents} K @param {K} type @param {(e: ClientEvents[K]) => void} fn */
  off(type, fn) {
    this._handlers.get(type)?.delete(fn);
  }
  /**
   * Send an ordered move to every other member. @returns {number} its seq
   *
   * While the client is reconnecting, this and the other send calls queue the
   * move: it goes out after the next WELCOME (see Resume in the README).
   */
  sendEvent(data) {
    const seq = this._nextSeq();
    this._queueMove(seq, event(seq, data));
    return seq;
  }
  /**
   * Set this player's value under key (data null deletes it); kept in the room snapshot.
   * @param {string|number} key @param {any} data @returns {number} its seq
   */
  sendState(key, data) {
    const seq = this._nextSeq();
    this._queueMove(seq, state(seq, key, data), { key, data });
    if (!this.options.echo && this.view.actor !== null)
      this.view.setState(this.view.actor, key, data);
    return seq;
  }
  /**
   * Send a move to one member only.
   * @param {number} toActor @param {any} data @returns {number} its seq
   */
  sendDirect(toActor, data) {
    const seq = this._nextSeq();
    this._queueMove(seq, direct(seq, toActor, data), void 0, true);
    return seq;
  }
  /**
   * Round-trip time to the server, in ms. Rejects if the connection closes first.
   * @returns {Promise<number>}
   */
  ping() {
    if (this.status !== "open")
      return Promise.reject(new RelayError(`not connected (status: ${this.status})`));
    const sentAt = performance.now();
    return new Promise((resolve, reject) => {
      const waiting = this._pings.get(sentAt);
      if (waiting) return waiting.push({ resolve, reject });
      this._pings.set(sentAt, [{ resolve, reject }]);
      this._queue(encodeMessage(ping(sentAt)));
    });
  }
  /** Leave the room for good: no reconnect. A browser accepts code 1000 or 3000-4999. */
  close(code = 1e3, reason = "") {
    this._closedByUser = true;
    clearTimeout(this._timer);
    if (this.socket && this.socket.readyState <= 1) {
      this._flush();
      this.socket.close(code, reason);
    } else {
      this._finish(code, reason);
    }
  }
  // --- internals ------------------------------------------------------------------
  _nextSeq() {
    if (this.status === "reconnecting") {
      if (this._seq - this._wiredSeq >= RESEND_BUFFER)
        throw new RelayError(
          `not connected (status: reconnecting), and ${RESEND_BUFFER} moves already wait`
        );
    } else if (this.status !== "open") {
      throw new RelayError(`not connected (status: ${this.status})`);
    }
    return ++this._seq;
  }
  /**
   * Keep an own move for re-sending; send it now when open, else after the next WELCOME.
   * @param {number} seq @param {unknown[]} message @param {SentMove['state']} [state]
   * @param {boolean} [direct]
   */
  _queueMove(seq, message, state2, direct2 = false) {
    const bytes = encodeMessage(message);
    this._sent.push(
      state2 ? { seq, bytes, state: state2 } : direct2 ? { seq, bytes, direct: direct2 } : { seq, bytes }
    );
    if (this._sent.length > RESEND_BUFFER) this._sent.shift();
    if (this.status === "open") this._queue(bytes, seq);
  }
  /** Messages wait for the end of the current task, then go out together as one frame. */
  _queue(bytes, seq = 0) {
    this._pending.push({ bytes, seq });
    if (this._flushQueued) return;
    this._flushQueued = true;
    queueMicrotask(() => this._flush());
  }
  _flush() {
    this._flushQueued = false;
    if (this._pending.length === 0) return;
    const pending = this._pending;
    this._pending = [];
    if (this.socket?.readyState !== 1) return;
    const bytes = pending.map((p) => p.bytes);
    for (const frame of packFrames(bytes, this.limits.max_frame_bytes ?? Infinity))
      this.socket.send(frame);
    for (const p of pending) if (p.seq > this._wiredSeq) this._wiredSeq = p.seq;
  }
  _open() {
    const Socket = this.options.WebSocket ?? globalThis.WebSocket;
    const from = this._resumeFrom;
    const url = new URL(from ? this._resumeUrl(from) : this.url);
    if (typeof this.options.token === "function")
      url.searchParams.set("token", this.options.token());
    const socket = new Socket(url.href);
    socket.binaryType = "arraybuffer";
    let ended = false;
    const end = (code, reason) => {
      if (ended || this.socket !== socket) return;
      ended = true;
      this._onClose(code, reason);
    };
    socket.onmessage = (ev) => this.socket === socket && this._onFrame(ev.data);
    socket.onclose = (ev) => end(ev.code, ev.reason);
    socket.onerror = () => {
      setTimeout(() => {
        if (ended) return;
        try {
          socket.close();
        } catch {
        }
        end(1006, "");
      }, ERROR_GRACE_MS);
    };
    this.socket = socket;
  }
  _onFrame(data) {
    if (!(data instanceof ArrayBuffer || ArrayBuffer.isView(data))) return;
    let messages;
    try {
      messages = decodeFrame(
        /** @type {ArrayBuffer} */
        data
      );
    } catch (err) {
      this._emit("error", {
        seq: null,
        code: "undecodable",
        message: `frame is not valid msgpack: ${err}`
      });
      return;
    }
    for (const msg of messages) this._onMessage(msg);
  }
  _onMessage(msg) {
    switch (msg.type) {
      case "welcome":
        return this._onWelcome(msg);
      case "event": {
        this.view.apply(msg);
        return this._emit("event", {
          from: msg.from,
          seq: msg.seq,
          data: msg.data,
          offset: msg.offset
        });
      }
      case "state": {
        const previous = this.view.apply(msg);
        return this._emit("state", {
          from: msg.from,
          key: msg.key,
          data: msg.data,
          previous,
          offset: msg.offset
        });
      }
      case "direct":
        return this._emit("direct", { from: msg.from, seq: msg.seq, data: msg.data });
      case "join":
        return this._emit("join", { ...this.view.apply(msg), offset: msg.offset });
      case "leave": {
        const left = this.view.apply(msg) ?? { actor: msg.actor, player: "", meta: {} };
        return this._emit("leave", { ...left, code: msg.code, offset: msg.offset });
      }
      case "error":
        if (msg.seq !== null) this._sent = this._sent.filter((m) => m.seq !== msg.seq);
        return this._emit("error", { seq: msg.seq, code: msg.code, message: msg.message });
      case "dropped": {
        this.droppedTotal += msg.count;
        return this._emit("dropped", { count: msg.count, total: this.droppedTotal });
      }
      case "pong": {
        const waiting = this._pings.get(msg.clientTime);
        if (!waiting) return;
        this._pings.delete(msg.clientTime);
        const rtt = performance.now() - msg.clientTime;
        for (const p of waiting) p.resolve(rtt);
      }
    }
  }
  _onWelcome(welcome) {
    const previousActor = this.view.actor;
    const rejoined = this._welcomed;
    const from = this._resumeFrom;
    this._resumeFrom = null;
    const sameEpoch = welcome.epoch === this.view.epoch;
    const sameSeat = rejoined && welcome.actor === previousActor && sameEpoch;
    const exact = from !== null && welcome.actor === from.actor && welcome.epoch === from.epoch && welcome.offset === from.offset;
    if (!exact) this.view.reset(welcome);
    this.limits = welcome.limits;
    this._resumeToken = typeof welcome.resumeToken === "string" ? welcome.resumeToken : null;
    this.status = "open";
    this._attempt = 0;
    this._welcomed = true;
    const unsentDirects = [];
    if (rejoined && !sameEpoch)
      this._sent = this._sent.filter((m) => {
        if (m.direct && m.seq > this._wiredSeq) unsentDirects.push(m.seq);
        return !m.direct;
      });
    if (rejoined) this._resend(sameSeat ? welcome.lastSeq ?? 0 : this._wiredSeq, !exact);
    this._emit("welcome", welcome);
    if (!rejoined) this._resolveReady(this);
    else if (exact) this._emit("resumed", { actor: welcome.actor, offset: welcome.offset });
    else this._emit("resynced", { actor: welcome.actor, previousActor, unsentDirects });
  }
  /**
   * After a reconnect's WELCOME: re-send, in order and ahead of anything else,
   * the own moves with a seq greater than `after`, and forget the others.
   * @param {number} after @param {boolean} fresh  the snapshot came from WELCOME
   */
  _resend(after, fresh) {
    this._sent = this._sent.filter((m) => m.seq > after);
    if (this._sent.length === 0) return;
    const again = this._sent.map((m) => ({ bytes: m.bytes, seq: m.seq }));
    this._pending = [...again, ...this._pending];
    if (!this._flushQueued) {
      this._flushQueued = true;
      queueMicrotask(() => this._flush());
    }
    if (fresh && !this.options.echo && this.view.actor !== null) {
      for (const m of this._sent)
        if (m.state) this.view.setState(this.view.actor, m.state.key, m.state.data);
    }
  }
  /** Where a reconnect should take the seat back from; null when it cannot. @returns {ResumePoint|null} */
  _resumePoint() {
    const { actor, offset, epoch } = this.view;
    const token = this._resumeToken;
    if (!token || actor === null || offset === null || epoch === null) return null;
    return { token, actor, offset, epoch, player: this.view.members.get(actor)?.player };
  }
  /** The socket URL with resume, offset and epoch, and this seat's player id. @param {ResumePoint} from */
  _resumeUrl(from) {
    const url = new URL(this.url);
    if (from.player) url.searchParams.set("player", from.player);
    url.searchParams.set("resume", from.token);
    url.searchParams.set("offset", String(from.offset));
    url.searchParams.set("epoch", from.epoch);
    return url.href;
  }
  _onClose(code, reason) {
    this._pending = [];
    for (const waiting of this._pings.values()) {
      for (const p of waiting)
        p.reject(new RelayError(`connection closed (${code})`, code, reason));
    }
    this._pings.clear();
    if (!this._welcomed && !this._closedByUser && this._firstTries < this.urls.length && shouldReconnect(code)) {
      this._firstTries += 1;
      this._at = (this._at + 1) % this.urls.length;
      return this._open();
    }
    const willReconnect = !this._closedByUser && this._welcomed && this.options.reconnect && shouldReconnect(code);
    if (!willReconnect) return this._finish(code, reason);
    if (this.status === "open")
      this._resumeFrom = RESUMABLE_CLOSE_CODES.has(code) ? this._resumePoint() : null;
    if (code === 1001 || this.status === "reconnecting")
      this._at = (this._at + 1) % this.urls.length;
    this.status = "reconnecting";
    this._emit("close", { code, reason, willReconnect });
    const delayMs = this._backoff();
    this._attempt += 1;
    this._emit("reconnecting", { attempt: this._attempt, delayMs });
    this._timer = setTimeout(() => this._open(), delayMs);
  }
  /** Exponential backoff with jitter, so a restarted server is not hit by everyone at once. */
  _backoff() {
    const { backoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs ?? 8e3, (backoffMs ?? 250) * 2 ** this._attempt);
    return Math.round(ceiling * (0.5 + Math.random() / 2));
  }
  _finish(code, reason) {
    const wasClosed = this.status === "closed";
    this.status = "closed";
    if (!this._welcomed) {
      const why = reason ? `: ${reason}` : "";
      this._rejectReady(
        new RelayError(`relay closed the connection with ${code}${why}`, code, reason)
      );
    }
    if (!wasClosed) this._emit("close", { code, reason, willReconnect: false });
  }
  /** @param {string} type @param {any} payload */
  _emit(type, payload) {
    for (const fn of this._handlers.get(type) ?? []) {
      try {
        fn(payload);
      } catch (err) {
        if (typeof globalThis.reportError === "function") globalThis.reportError(err);
        else console.error(err);
      }
    }
  }
};
export {
  CloseCode,
  FINAL_CLOSE_CODES,
  MsgType,
  RESEND_BUFFER,
  RESUMABLE_CLOSE_CODES,
  RelayClient,
  RelayError,
  RoomView,
  codec_exports as codec,
  connect,
  shouldReconnect,
  socketUrl
};
