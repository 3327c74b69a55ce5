"""The exit codes of every ``kvverify`` subcommand: 0 all passed, 1 a check failed, 2 the command was misused
(bad options, an unusable target, a device that is not there)."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
