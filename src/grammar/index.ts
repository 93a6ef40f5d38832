export {
  buildJsonGbnf,
  DEFAULT_SCHEMA_OPTION,
  gbnfLiteral,
  JSON_OBJECT_GBNF,
  JSON_VALUE_GBNF,
  jsonSchemaToGbnf,
} from './json-schema.js';
export type { JsonGrammarOptions, JsonSchemaGrammarOptions } from './json-schema.js';
