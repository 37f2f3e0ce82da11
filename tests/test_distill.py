"""Recovery by distillation from the unpruned model (issue #41): the KL to the teacher falls on
held-out tokens, masks and shapes survive, an interrupted run resumes to the uninterrupted result,
and the CLI records it in the results and the card."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, make_texts, make_tokenizer, tiny_model
from conftest import text_windows as windows

from optimum_prune import Pruner, PruningConfig
from optimum_prune.recovery import DistillConfig, distillation_loss, recover_distill
from optimum_prune.recovery import distill as distill_module


def pruned_pair(method="wanda", pattern="unstructured", sparsity=0.5):
    """(dense teacher, pruned student) of one tiny Llama."""
    student = tiny_model("llama", num_hidden_layers=2, initializer_range=0.2)  # peaked outputs, as a trained model's
    teacher = copy.deepcopy(student)
    Pruner(PruningConfig(method=method, pattern=pattern, sparsity=sparsity, num_calibration_samples=8,
                         seqlen=32)).prune(student, windows(8, seed=1), progress=False)
    return teacher, student


@torch.no_grad()
def heldout_kl(student, teacher, ids) -> float:
    return float(distillation_loss(student(ids).logits, teacher(ids).logits))


def test_the_loss_is_the_kl_divergence():
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(distillation_loss(b, a)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method, pattern, sparsity", [("wanda", "unstructured", 0.5), ("fasp", "structured", 0.3)])
def test_distillation_brings_the_student_closer_to_the_teacher(method, pattern, sparsity):
    teacher, student = pruned_pair(method, pattern, sparsity)
    heldout = windows(8, seed=7)
    dense = {name: p.clone() for name, p in teacher.state_dict().items()}
    before = heldout_kl(student, teacher, heldout)
    zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() == 2 and ".layers." in name}
    shapes = {name: p.shape for name, p in student.named_parameters()}
    found = recover_distill(student, teacher, windows(32, seed=3), DistillConfig(steps=60, lr=1e-3, batch_size=4,
                                                                               ce_weight=0.0), progress=False)
    after = heldout_kl(student, teacher, heldout)
    assert found["loss_last"] < found["loss_first"] and after < 0.9 * before, (before, after, found["loss_first"])
    assert {name: p.shape for name, p in student.named_parameters()} == shapes  # structured shapes kept
    for name, was_zero in zeros.items():  # unstructured zeros kept, none added by training
        now = dict(student.named_parameters())[name] == 0
        assert bool((now[was_zero]).all()), name
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), dense.values()))  # teacher untouched


def test_the_cross_entropy_share_weighs_the_two_losses_and_alone_needs_no_teacher():
    """(1 - w) KL + w CE on the first batch (the loss recorded before any step), and with w = 1
    (no hidden term) plain fine-tuning: no teacher, the next-token loss falls."""
    import torch.nn.functional as F

    from optimum_prune.errors import PruningError

    teacher, student = pruned_pair()
    data = windows(16, seed=3)
    first = DistillConfig(steps=1, lr=1e-3, batch_size=4)
    batch = distill_module._TrainingState(first, None).next_batch(data)
    with torch.no_grad():
        logits = student(batch).logits
        kl = float(distillation_loss(logits, teacher(batch).logits))
        ce = float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)))
    for weight in (0.0, 0.3, 1.0):
        found = recover_distill(copy.deepcopy(student), teacher, data, DistillConfig(steps=1, lr=1e-3, batch_size=4,
                                                                                     ce_weight=weight), progress=False)
        assert found["losses"][0] == pytest.approx((1 - weight) * kl + weight * ce, rel=1e-5)
    tuned = copy.deepcopy(student)
    found = recover_distill(tuned, None, data, DistillConfig(steps=40, lr=1e-3, batch_size=4, ce_weight=1.0),
                            progress=False)
    assert found["loss_last"] < found["loss_first"]
    with pytest.raises(PruningError, match="needs the dense model as teacher"):
        recover_distill(tuned, None, data, DistillConfig(steps=1, ce_weight=0.5), progress=False)
    with pytest.raises(PruningError, match="ce_weight is a share"):
        DistillConfig(ce_weight=1.5)
    with pytest.raises(PruningError, match="hidden_weight must be a non-negative number"):
        DistillConfig(hidden_weight=-1)


@torch.no_grad()
def heldout_hidden(student, teacher, ids) -> float:
    return float(distill_module.hidden_state_loss(student(ids, output_hidden_states=True).hidden_states,
                                                  teacher(ids, output_hidden_states=True).hidden_states))


def test_the_hidden_state_term_matches_layer_outputs_where_the_depth_allows():
    """Every layer's output when the student keeps the teacher's depth (width pruning), the final
    hidden state when a layer went; training with the term brings the student's hidden states
    closer to the teacher's on held-out tokens than training on the logits alone."""
    from optimum_prune.structure.shrink import remove_layers

    states = [torch.randn(2, 5, 8) for _ in range(4)]  # embeddings + 3 layer outputs
    moved = [states[0], states[1] + 1, states[2], states[3]]
    expected = float(((moved[1] - states[1]).pow(2).sum(-1) / states[1].pow(2).sum(-1)).mean()) / 3
    assert float(distill_module.hidden_state_loss(moved, states)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_module.hidden_state_loss(moved[:1] + moved[2:], states)) == pytest.approx(0.0, abs=1e-7)

    teacher, student = pruned_pair("fasp", "structured", 0.3)
    heldout, data = windows(8, seed=7), windows(32, seed=3)
    before = heldout_hidden(student, teacher, heldout)
    logits_only, with_hidden = copy.deepcopy(student), copy.deepcopy(student)
    recover_distill(logits_only, teacher, data, DistillConfig(steps=30, lr=1e-3, batch_size=4, ce_weight=0.0),
                    progress=False)
    found = recover_distill(with_hidden, teacher, data, DistillConfig(steps=30, lr=1e-3, batch_size=4, ce_weight=0.0,
                                                                                  hidden_weight=1.0),
                            progress=False)
    assert found["loss_last"] < found["loss_first"]
    assert heldout_hidden(with_hidden, teacher, heldout) < min(before, heldout_hidden(logits_only, teacher, heldout))

    shallow = copy.deepcopy(student)
    remove_layers(shallow, [1])  # one of the two layers gone: only the final states are compared
    found = recover_distill(shallow, teacher, data, DistillConfig(steps=20, lr=1e-3, batch_size=4, hidden_weight=1.0),
                            progress=False)
    assert found["loss_last"] < found["loss_first"] and shallow.config.num_hidden_layers == 1


def test_distillation_through_lora_adapters_trains_only_them_and_merges_back(tmp_path, monkeypatch):
    """distill-lora: the KL to the teacher falls on held-out tokens, only the adapters train (the
    memory of LoRA: no gradient or moment of a base weight), they are merged back (no peft module
    left), the zeros are put back after the dense merge; an interrupted run resumes to the same weights."""
    from optimum_prune.recovery.memory import training_memory
    from optimum_prune.workflow import Recovery

    teacher, student = pruned_pair()
    heldout, data = windows(8, seed=7), windows(32, seed=3)
    zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() == 2 and ".layers." in name}
    config = DistillConfig(steps=60, lr=1e-2, batch_size=4, ce_weight=0.0, lora_rank=8, save_every=4)
    reference = copy.deepcopy(student)
    stepped = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        stepped.append(sum(p.numel() for group in self.param_groups for p in group["params"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    before = heldout_kl(reference, teacher, heldout)
    found = recover_distill(reference, teacher, data, config, progress=False)
    monkeypatch.undo()
    adapters = sum(8 * (m.in_features + m.out_features) for name, m in reference.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in name)
    assert set(stepped) == {adapters} and found["lora_alpha"] == 16
    planned = training_memory(reference, Recovery(distill=config), 32)
    assert "gradients and optimiser" not in planned and planned["adapters, gradients and optimiser"] == 16 * adapters
    # (a tiny random model: the adapters fit the 32 training windows far better than held-out ones)
    assert heldout_kl(reference, teacher, heldout) < 0.98 * before and found["loss_last"] < 0.5 * found["loss_first"]
    assert not any("lora" in name for name, _ in reference.named_modules())
    for name, was_zero in zeros.items():
        assert bool((dict(reference.named_parameters())[name][was_zero] == 0).all()), name

    interrupt_at(monkeypatch, 11)  # steps 1-8 saved
    with pytest.raises(KeyboardInterrupt):
        recover_distill(student, teacher, data, config, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert not any("lora" in name for name, _ in student.named_modules())  # merged even when interrupted
    student = pruned_pair()[1]  # a fresh process would load the pruned model again
    recover_distill(student, teacher, data, config, progress=False, checkpoint_dir=tmp_path)
    for (name, a), (_, b) in zip(reference.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), name


def interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C in the ``call``-th training step (its loss)."""
    real, calls = distill_module.distillation_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "distillation_loss", killed)


@pytest.mark.parametrize("place", ["cpu", "disk"])
def test_an_offloaded_teacher_trains_the_student_to_the_same_weights(tmp_path, place):
    """The teacher's weights in host memory or on disk, each module brought in for its forward: the
    same logits, so the same recovery as a teacher held beside the student; its weights are not
    resident (meta), its copy does not follow the student's training, its disk folder goes with it."""
    import gc

    from optimum_prune.workflow import Recovery

    dense, student = pruned_pair("fasp", "structured", 0.3)
    reference_student = copy.deepcopy(student)
    settings = DistillConfig(steps=6, lr=1e-3, batch_size=4, ce_weight=0.5, hidden_weight=1.0)
    recovery = Recovery(distill=settings, teacher_place=place, teacher_folder=str(tmp_path / "teachers"))
    teacher = recovery.teacher_of(dense)
    assert all(p.device.type == "meta" for p in teacher.parameters())
    (tmp_path / "teachers").mkdir(exist_ok=True)
    assert len(list((tmp_path / "teachers").iterdir())) == (place == "disk")
    train = windows(16, seed=3)
    recover_distill(reference_student, copy.deepcopy(dense), train, settings, progress=False)
    found = recover_distill(student, teacher, train, settings, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), reference_student.state_dict().values()))
    assert found["loss_last"] < found["loss_first"]
    from optimum_prune.recovery.memory import training_memory

    held = training_memory(dense, Recovery(distill=settings), 32)
    offloaded = training_memory(dense, recovery, 32)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in dense.modules()) * 4
    if place == "disk":  # only the largest module's weights at a time on the device
        assert offloaded.pop("teacher (offloaded to disk, one module at a time)") == largest < held.pop("teacher")
        assert offloaded == held
    else:  # host memory is the CPU device's own memory: all of it counted
        assert offloaded == held
    del teacher
    gc.collect()
    assert not list((tmp_path / "teachers").iterdir())  # the temporary folder went with the teacher


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    teacher, student = pruned_pair()
    config = DistillConfig(steps=8, lr=1e-3, batch_size=4, save_every=3)
    data = windows(12, seed=3)
    reference = copy.deepcopy(student)
    recover_distill(reference, teacher, data, config, progress=False)
    interrupt_at(monkeypatch, 6)  # steps 1-3 were saved, 4-5 are lost
    with pytest.raises(KeyboardInterrupt):
        recover_distill(student, teacher, data, config, progress=False, checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / distill_module.STATE_NAME, weights_only=False)["step"] == 3
    monkeypatch.undo()
    found = recover_distill(student, teacher, data, config, progress=False, checkpoint_dir=tmp_path)
    assert len(found["losses"]) == 8 and not list(tmp_path.iterdir())  # the state goes once the run is done
    for (name, a), (_, b) in zip(reference.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_state_of_other_settings_is_refused(tmp_path, monkeypatch):
    from optimum_prune.errors import PruningError

    teacher, student = pruned_pair()
    data = windows(8, seed=3)
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        recover_distill(student, teacher, data, DistillConfig(steps=4, lr=1e-3, batch_size=4, save_every=1),
                        progress=False, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    with pytest.raises(PruningError, match="other settings or data"):
        recover_distill(student, teacher, data, DistillConfig(steps=5, lr=1e-3, batch_size=4), progress=False,
                        checkpoint_dir=tmp_path)


def test_cli_distills_and_records_it(tmp_path, capsys):
    from optimum_prune.commands.prune import main

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(60)))
    code = main(["--model", str(tmp_path / "model"), "--method", "fasp", "--pattern", "structured", "--sparsity", "0.2",
                 "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress",
                 "--recover", "distill", "--recover-steps", "4", "--recover-samples", "8", "--eval",
                 "--eval-dataset", str(tmp_path / "calib.txt"), "--output", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "distillation: 4 steps" in out.out
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert results["recovery"]["method"] == "distill" and results["recovery"]["tokens"] == 4 * 4 * 32
    assert len(results["recovery"]["losses"]) == 4 and "perplexity_recovered" in results
    card = (tmp_path / "out" / "README.md").read_text()
    assert "distillation from the dense model" in card and "pruned + distillation" in card


def test_cli_sets_the_distillation_loss_and_refuses_its_flags_without_distill(tmp_path, capsys):
    from optimum_prune.commands.prune import main

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(60)))
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "model"), "--method", "fasp", "--pattern", "structured", "--sparsity", "0.2",
            "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress",
            "--recover-steps", "3", "--recover-samples", "8"]
    for flag, value in (("--recover-ce-weight", "0.5"), ("--recover-hidden-weight", "1"), ("--recover-temperature", "2"),
                        ("--recover-teacher", "disk"), ("--recover-teacher-dtype", "bfloat16")):
        assert main([*argv, "--recover", "lora", flag, value, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} needs --recover distill" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--recover", "distill", "--recover-ce-weight", "2", "--output", str(tmp_path / "x")]) == 2
    assert "ce_weight is a share" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*argv, "--recover", "distill", "--recover-ce-weight", "0.5", "--recover-hidden-weight", "1",
                 "--recover-temperature", "2", "--output", str(tmp_path / "out")]) == 0
    assert "training loss" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "out" / "pruning_results.json").read_text())["recovery"]
    assert (recorded["ce_weight"], recorded["hidden_weight"], recorded["temperature"]) == (0.5, 1.0, 2.0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "0.5 of the loss the next-token cross-entropy" in card and "distance of the hidden states" in card
    assert main([*argv, "--recover", "distill-lora", "--recover-rank", "4", "--recover-teacher", "disk",
                 "--recover-teacher-dtype", "bfloat16", "--output", str(tmp_path / "lora")]) == 0
    recorded = json.loads((tmp_path / "lora" / "pruning_results.json").read_text())["recovery"]
    assert (recorded["lora_rank"], recorded["lora_alpha"], recorded["lr"]) == (4, 8, 2e-4)
    assert (recorded["teacher_place"], recorded["teacher_dtype"]) == ("disk", "bfloat16")
    assert "LoRA adapters (rank 4, alpha 8) trained and merged" in (tmp_path / "lora" / "README.md").read_text()


def test_cli_resumes_an_interrupted_distillation(tmp_path, capsys, monkeypatch):
    """Ctrl-C during --recover distill with --checkpoint-dir; the same command with --resume
    replays the finished prune, continues the distillation from its saved step and saves the
    model an uninterrupted run saves."""
    from safetensors.torch import load_file

    from optimum_prune.commands.prune import main

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(60)))

    def argv(out, *extra):
        return ["--model", str(tmp_path / "model"), "--method", "wanda", "--sparsity", "0.5", "--dataset",
                str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress", "--recover",
                "distill", "--recover-steps", "12", "--recover-samples", "8", "--output", str(tmp_path / out), *extra]

    assert main(argv("reference")) == 0
    interrupt_at(monkeypatch, 11)  # steps 1-10 saved
    assert main(argv("out", "--checkpoint-dir", str(tmp_path / "ckpt"))) == 130
    assert (tmp_path / "ckpt" / distill_module.STATE_NAME).is_file() and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert main(argv("out", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume")) == 0
    capsys.readouterr()
    reference, resumed = load_file(tmp_path / "reference" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not (tmp_path / "ckpt").exists()


def test_the_plan_covers_the_recovery_and_a_run_that_will_not_fit_is_refused_first(tmp_path, capsys, monkeypatch):
    """--dry-run plans the training after the prune (teacher, gradients and AdamW's moments,
    activations, logits) beside the prune's own peak, and the real run refuses a recovery that will
    not fit in one line before it loads anything else or prunes a weight."""
    from optimum_prune.commands.prune import main
    from optimum_prune.recovery import LoraRecoveryConfig, memory
    from optimum_prune.recovery.memory import training_memory
    from optimum_prune.workflow import Recovery

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(60)))
    argv = ["--model", str(tmp_path / "model"), "--method", "wanda", "--sparsity", "0.5", "--dataset",
            str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress"]
    assert main([*argv, "--dry-run"]) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--dry-run", "--recover", "distill", "--recover-batch-size", "2"]) == 0
    planned = capsys.readouterr().out
    assert "after the prune, the distillation" not in plain
    assert "after the prune, the distillation" in planned and "distillation teacher" in planned
    for part in ("teacher", "gradients and optimiser", "activations", "logits"):
        assert part in planned

    model = tiny_model("llama", num_hidden_layers=2)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    distill = training_memory(model, Recovery(distill=DistillConfig(batch_size=2)), 32)
    lora = training_memory(model, Recovery(LoraRecoveryConfig(batch_size=2)), 32)
    assert distill["teacher"] == params and distill["gradients and optimiser"] == 3 * params
    assert distill["logits"] == 6 * 2 * 32 * VOCAB * 4 and lora["logits"] == 4 * 2 * 32 * VOCAB * 4
    assert sum(lora.values()) < sum(distill.values())  # the adapters train, not every parameter
    half = training_memory(model, Recovery(distill=DistillConfig(batch_size=2), teacher_dtype="bfloat16"), 32)
    assert half["teacher"] == params // 2

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    assert main([*argv, "--recover", "distill", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "The distillation after the prune needs about" in err and "--recover-batch-size" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_recover_dataset_trains_on_its_own_text(tmp_path, capsys, monkeypatch):
    """--recover-dataset: the recovery's windows come from that text, not from --dataset; it is
    recorded; a missing local file or the flag without --recover is one line before any work."""
    from optimum_prune import workflow
    from optimum_prune.commands.prune import main

    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(make_texts(60)))
    (tmp_path / "train.txt").write_text("\n\n".join(make_texts(60, seed=7)))
    sources = []
    original = workflow.Recovery.apply

    def spy(self, model, tokenizer, config, *args, **kwargs):
        sources.append(self.dataset or config.dataset)
        return original(self, model, tokenizer, config, *args, **kwargs)

    monkeypatch.setattr(workflow.Recovery, "apply", spy)
    argv = ["--model", str(tmp_path / "model"), "--method", "wanda", "--sparsity", "0.5", "--dataset",
            str(tmp_path / "calib.txt"), "--num-samples", "4", "--seqlen", "32", "--no-progress"]
    assert main([*argv, "--recover", "lora", "--recover-steps", "2", "--recover-samples", "4",
                 "--recover-dataset", str(tmp_path / "train.txt"), "--output", str(tmp_path / "out")]) == 0
    assert sources == [str(tmp_path / "train.txt")]
    results = json.loads((tmp_path / "out" / "pruning_results.json").read_text())
    assert results["recovery"]["dataset"] == str(tmp_path / "train.txt")
    assert f"trained on {tmp_path / 'train.txt'}" in (tmp_path / "out" / "README.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--recover", "lora", "--recover-dataset", str(tmp_path / "nope.txt"),
                 "--output", str(tmp_path / "x")]) == 2
    assert "--recover-dataset:" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*argv, "--recover-dataset", str(tmp_path / "train.txt"), "--output", str(tmp_path / "y")]) == 2
    assert "--recover-dataset needs --recover" in capsys.readouterr().err


def test_distillation_trainer_trains_with_the_same_loss_and_keeps_the_zeros(tmp_path):
    """`DistillationTrainer` (transformers.Trainer): its loss on a batch is `recover_distill`'s, the
    student comes closer to the teacher on held-out tokens, and the prune's zeros are kept."""
    from transformers import TrainingArguments

    from optimum_prune.errors import PruningError
    from optimum_prune.recovery import DistillationTrainer
    from optimum_prune.recovery.distill import training_loss

    teacher, student = pruned_pair()
    zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() == 2 and ".layers." in name}
    heldout = windows(8, seed=7)
    before = heldout_kl(student, teacher, heldout)
    train = windows(32, seed=3)
    settings = DistillConfig(ce_weight=0.0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, distill_config=settings, args=args,
                                  train_dataset=[{"input_ids": row} for row in train])
    batch = train[:4]
    for mixed in (settings, DistillConfig(ce_weight=0.5, hidden_weight=1.0)):
        trainer.distill_config = mixed
        assert torch.equal(trainer.compute_loss(student, {"input_ids": batch}),
                           training_loss(student, teacher, batch, mixed)[0])
    trainer.distill_config = settings
    trainer.train()
    after = heldout_kl(student, teacher, heldout)
    assert after < 0.9 * before, (before, after)
    for name, p in student.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name
    with pytest.raises(PruningError, match="needs the dense model"):
        DistillationTrainer(model=student, args=args, train_dataset=[{"input_ids": row} for row in train])


@torch.no_grad()
def test_the_loss_counts_only_the_tokens_the_attention_mask_keeps():
    """Right-padded rows: the ids under the padding change nothing, and the loss is the loss of the
    rows cut before the padding."""
    from optimum_prune.recovery.distill import training_loss

    teacher, student = pruned_pair()
    batch = windows(4, seed=5)
    mask = torch.ones_like(batch)
    mask[:, 24:] = 0
    other = batch.clone()
    other[:, 24:] = (other[:, 24:] + 1) % VOCAB
    for settings in (DistillConfig(ce_weight=0.0), DistillConfig(ce_weight=0.5), DistillConfig(ce_weight=1.0)):
        padded = float(training_loss(student, teacher, batch, settings, mask)[0])
        assert padded == pytest.approx(float(training_loss(student, teacher, other, settings, mask)[0]), rel=1e-5)
        assert padded == pytest.approx(float(training_loss(student, teacher, batch[:, :24], settings)[0]), rel=1e-4)
