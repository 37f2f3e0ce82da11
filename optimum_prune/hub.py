"""Publishing a saved output folder on the Hugging Face Hub.

Only a folder that was saved completely is uploaded (the caller saves first), whole and as it is
on disk: weights, tokenizer, ``pruning_config.json``, ``pruning_results.json``, the model card and,
for heterogeneous models, the modelling file named by ``auto_map`` (not the local record of the
files a save wrote, ``.optimum-prune-output.json``). A failed upload leaves the
local folder untouched and ends in one `PruningError` line.
"""

from __future__ import annotations

import os

from .errors import PruningError
from .output import OUTPUT_MARKER


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any work starts."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PruningError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({err}); use 'name' or 'org/name'.") from None


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "pruning_config.json")):
        raise PruningError(f"{folder} is not a saved optimum-prune output (no pruning_config.json); save it first.")
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", ignore_patterns=[OUTPUT_MARKER],
                                 commit_message=commit_message or "Upload model pruned with optimum-prune")
    except Exception as err:  # network, authentication, permissions, quota
        first = str(err).splitlines()[0] if str(err) else ""
        raise PruningError(f"Upload of {folder} to {repo_id} failed ({type(err).__name__}: {first}); the local folder "
                           f"is kept: check the token (HF_TOKEN or `hf auth login`) and retry with "
                           f"Pruner.push_to_hub or `hf upload {repo_id} {folder}`.") from None
    return str(getattr(info, "commit_url", info))
