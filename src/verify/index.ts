export { canonicalJson } from './canonical.js';
export {
  FINGERPRINT_PAYLOAD_TYPE,
  FINGERPRINT_STATEMENT_TYPE,
  checkFingerprints,
  keySetSha256,
  makeFingerprints,
  verifyFingerprintVerdict,
} from './fingerprint.js';
export type { FingerprintCheckOptions, FingerprintPair, FingerprintStatement, FingerprintVerdict } from './fingerprint.js';
export { hashCacheDir, hashCacheFile, hashModel, hashStats, verifyModelFile } from './identity.js';
export type { HashModelOptions, ModelDigest, TensorDigest } from './identity.js';
export { configDir, keyIdOf, loadOrCreateReceiptKey, rawPublicKey, receiptKeyPath, toPublicKey } from './keys.js';
export type { ReceiptKey } from './keys.js';
export {
  RECEIPT_PAYLOAD_TYPE,
  RECEIPT_STATEMENT_TYPE,
  chatPromptTokens,
  createReceipt,
  decodeReceipt,
  generateWithReceipt,
  modelFacts,
  pae,
  replayReceipt,
  samplerChain,
  samplingFromReceipt,
  signStatement,
  tokensSha256,
  verifyReceipt,
} from './receipt.js';
export type {
  ModelFacts,
  ReceiptEnvelope,
  ReceiptInput,
  ReceiptOptions,
  ReceiptReason,
  ReceiptReasonCode,
  ReceiptSamplerParams,
  ReceiptStatement,
  ReceiptVerification,
  ReplayReport,
  TokenRecord,
  VerifyReceiptOptions,
} from './receipt.js';
