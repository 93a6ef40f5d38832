export { readGguf } from './reader.js';
export { encodeTensorData, f16BitsToF32, f32ToF16Bits, quantizeQ4_0, quantizeQ8_0, writeGguf } from './writer.js';
export type {
  GgufMetadataEntry,
  GgufTensorData,
  GgufTensorInput,
  GgufWritableValue,
  GgufWriteInput,
} from './writer.js';
export {
  GGML_MAX_DIMS,
  GGML_MAX_NAME,
  GGML_TYPES,
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_SCALAR_SIZE,
  GgmlType,
  GgufValueTypeId,
  ggmlTensorByteSize,
  ggmlTypeInfo,
  ggufValueTypeName,
} from './types.js';
export type {
  GgmlTypeInfo,
  GgmlTypeName,
  GgufArrayStorage,
  GgufArrayValue,
  GgufBigIntTypeName,
  GgufFile,
  GgufMetadataValue,
  GgufNumberTypeName,
  GgufScalarTypeName,
  GgufScalarValue,
  GgufTensorInfo,
  GgufValueTypeName,
} from './types.js';
