export { loadModel, Model } from './model.js';
export type { ChatMessage, EmbeddingResult, EngineStats, ExpertLayerStats, ExpertPlacement, ExpertPlacementLayer, ExpertStats, ModelInfo, Placement } from './model.js';
export { startRpcServer } from './rpc.js';
export { fuse, FusedModel } from './fusion.js';
export type { FusionMember } from './fusion.js';
export type { RpcServer, RpcServerOptions } from './rpc.js';
export { Generation } from './generation.js';
export type { FinishReason, GenerationChunk, GenerationResult, GenerationTimings } from './generation.js';
export type { ChatOptions, GenerateOptions, KvCacheType, LoadModelOptions, SamplingOptions } from './options.js';
export { KV_CACHE_TYPES } from './options.js';
export {
  AbortError,
  ContextOverflowError,
  DisposedError,
  GenesisError,
  InvalidOptionError,
  MemoryBudgetError,
  ModelLoadError,
  QueueFullError,
  RpcError,
} from './errors.js';
export type { GenesisErrorCode, ModelLoadErrorCode } from './errors.js';
export { cudaProfilerRange, measureBandwidth, systemInfo } from './system.js';
export { MOE_ROUTING_SHAPES, moeRoute } from './moe.js';
export type { MoeRoutingParams, MoeRoutingResult } from './moe.js';
export { estimateMemory, formatBytes, planMemory } from './memory.js';
export { createRuntime, Runtime } from './runtime.js';
export type { ModelLease, RuntimeModelOptions, RuntimeModelState, RuntimeModelStatus, RuntimeOptions } from './runtime.js';
export type { DeviceMemoryEstimate, MemoryBudget, MemoryEstimate, MemoryPlan } from './memory.js';
export type { BandwidthOptions, BandwidthResult } from './system.js';
export { buildJsonGbnf, JSON_OBJECT_GBNF, JSON_VALUE_GBNF, jsonSchemaToGbnf } from './grammar/index.js';
export type { JsonGrammarOptions, JsonSchemaGrammarOptions } from './grammar/index.js';
export {
  checkFingerprints,
  createReceipt,
  generateWithReceipt,
  makeFingerprints,
  verifyFingerprintVerdict,
  hashModel,
  loadOrCreateReceiptKey,
  replayReceipt,
  verifyModelFile,
  verifyReceipt,
} from './verify/index.js';
export type { FingerprintPair, FingerprintVerdict, ModelDigest, ReceiptEnvelope, ReceiptStatement } from './verify/index.js';
