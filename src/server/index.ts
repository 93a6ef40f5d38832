export { buildServer, ServerConfigError } from './app.js';
export type { GenesisServer, GenesisServerExtras, ServerOptions } from './app.js';
export { ApiError } from './errors.js';
export type { ApiErrorBody, ApiErrorType } from './errors.js';
export { isLoopbackHost } from './auth.js';
export type { ModelsOption, RuntimeModels, ServedModel, ServedModelInput } from './models.js';
export { serve } from './serve.js';
export type { ServeHandle, ServeModelSpec, ServeOptions } from './serve.js';
export type { FusedModelSpec, FusedServedModel } from './fused.js';
