# Registers `optimum-cli prune`. optimum-cli imports every module here at start-up, unguarded:
# a failure in this file must never break the other commands, so it is caught.
try:
    from optimum_prune.commands.prune import PruneCommand
except Exception:  # pragma: no cover - only when optimum-prune is broken
    REGISTER_COMMANDS = []
else:
    REGISTER_COMMANDS = [PruneCommand]
