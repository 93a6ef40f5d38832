/** A command line that cannot be run as given: printed with the usage text, exit status 2. */
export class UsageError extends Error {}
