"""Small cache modules used as ``MODULE:FACTORY`` targets by the tests: correct ones written without kvverify's
help, and buggy ones, each with one planted bug or one way of being an unusable target."""
