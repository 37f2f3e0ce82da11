"""The engine room: the plan of a prune (one task per piece of work, `tasks/`), the engines that
walk the model (`layerwise.py` layer by layer, `global_search.py` over the whole model), the
problems handed to methods, checkpoints and resume, the report, and the memory and time estimates."""
