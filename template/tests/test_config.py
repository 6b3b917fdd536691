"""Bad config values fail before any compute: the key, the bad value and what is allowed are named."""

import re
import shutil

import pytest
import torch
from conftest import CONFIG_DIR, PROJECT_ROOT, TASKS, compose_config, run_in_process
from omegaconf import OmegaConf


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("optimizer.name=adamx", "[adamw, adam, sgd]"),
        ("trainer.mixed_precision=fp8", "[no, fp16, bf16]"),
        ("scheduler.name=cosin", "[constant, constant_with_warmup, linear, cosine]"),
        ("checkpoint.keep=all", "[latest, best, top_k]"),
        ("checkpoint.mode=maximum", "[min, max]"),
        ("trainer.log_with=tensorbord", "[tensorboard, wandb, mlflow, aim, none]"),
    ],
)
def test_bad_choice_fails_at_compose_with_key_and_allowed_values(make_config, override, allowed):
    key, bad = override.split("=")
    with pytest.raises(Exception) as error:
        make_config(override)
    message = f"{error.value} {error.value.__cause__}"
    assert f"Invalid value '{bad}', expected one of {allowed}" in message
    assert key in message


@pytest.mark.parametrize(
    "override, problem",
    [
        ("optimizer.lr=0", "optimizer.lr=0.0 is out of range: it must be > 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr=-0.001 is out of range: it must be > 0"),
        ("data.batch_size=0", "data.batch_size=0 is out of range: it must be >= 1"),
        (
            "trainer.gradient_accumulation_steps=0",
            "trainer.gradient_accumulation_steps=0 is out of range: it must be >= 1",
        ),
        ("trainer.max_steps=0", "trainer.max_steps=0 is out of range: it must be >= 1"),
        ("trainer.seed=-1", "trainer.seed=-1 is out of range: it must be >= 0"),  # numpy refuses such seeds
        ("trainer.seed=4294967296", "trainer.seed=4294967296 is out of range: it must be <= 4294967295"),
        ("optimizer.beta2=1", "optimizer.beta2=1.0 is out of range: it must be < 1"),  # torch's ValueError, later
    ],
)
def test_nonsense_number_fails_validation_naming_key_and_range(pkg, make_config, override, problem):
    with pytest.raises(pkg.config.ConfigError) as error:
        pkg.config.validate(make_config(override))
    assert problem in str(error.value)


def test_all_problems_are_reported_at_once(pkg, make_config):
    with pytest.raises(pkg.config.ConfigError) as error:
        pkg.config.validate(make_config("optimizer.lr=0", "data.batch_size=0"))
    assert "optimizer.lr" in str(error.value) and "data.batch_size" in str(error.value)


def test_data_needs_exactly_one_source(pkg, make_config):
    with pytest.raises(pkg.config.ConfigError, match="exactly one of data.name"):
        pkg.config.validate(make_config("data=files", "data.name=wordfreq_langid"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where there is a GPU")
@pytest.mark.parametrize(
    "target, message",
    [
        ("mine.Net", "mine.Net: no module 'mine' can be imported"),
        ("mine.models.Net", "no module 'mine.models' can be imported"),
        ("Net", "no module 'Net' can be imported; give package.module.Class"),
        ("needs_more.Net", "its module imports 'a_package_not_installed_here', which is not installed here"),
        ("own.Nett", "module own has no class 'Nett'; did you mean own.Net?"),
        ("own.torch", "module own has no class 'torch'; its classes are ['Net']"),  # a module, not a class
        ("own.helper", "module own has no class 'helper'; its classes are ['Net']"),
    ],
)
def test_a_target_that_cannot_be_imported_is_named_with_why(pkg, tmp_path, monkeypatch, target, message):
    (tmp_path / "own.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    pass\n\ndef helper():\n    pass\n"
    )
    (tmp_path / "needs_more.py").write_text("import a_package_not_installed_here\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(pkg.config.ConfigError, match=re.escape(f"model._target_={target}: ")) as refused:
        pkg.config.import_target("model._target_", target)
    assert message in str(refused.value)
    assert pkg.config.import_target("model._target_", "own.Net").__name__ == "Net"


def test_fp16_without_gpu_fails_at_config_time(pkg, make_config):
    with pytest.raises(pkg.config.ConfigError, match="trainer.mixed_precision=fp16 needs a CUDA GPU"):
        pkg.config.validate(make_config("trainer.mixed_precision=fp16"))


def test_default_config_is_valid(pkg, make_config):
    pkg.config.validate(make_config())


@pytest.mark.parametrize("task", TASKS)
def test_an_optimizer_chosen_by_name_brings_its_own_file_and_not_the_tasks_values(task):
    """A task tunes the learning rate and weight decay of its default optimizer (AdamW); optimizer=sgd must train with
    configs/optimizer/sgd.yaml's, which the task's values silently replaced (SGD at an AdamW learning rate)."""
    sgd = OmegaConf.load(CONFIG_DIR / "optimizer" / "sgd.yaml")
    assert compose_config(f"task={task}", "optimizer=sgd").optimizer == OmegaConf.merge(
        compose_config(f"task={task}").optimizer, sgd
    )
    task_file = OmegaConf.load(next((CONFIG_DIR / "task").glob(f"{task}.yaml")))
    if "optimizer" in task_file:  # the default optimizer keeps the task's values
        assert compose_config(f"task={task}").optimizer.lr == task_file.optimizer.lr


@pytest.mark.parametrize("task", TASKS)
def test_a_mode_against_the_tasks_main_metric_is_refused(pkg, task):
    """checkpoint.mode=min with checkpoint.monitor unset (the task's main metric, accuracy): keep=best, early stopping
    and a sweep's direction all turned the wrong way, refused only where the monitor was spelt out."""
    built = pkg.config.build_task(compose_config(f"task={task}").task)
    opposite = {"min": "max", "max": "min"}[built.metrics[built.main_metric].value]
    message = f"checkpoint.mode={opposite} contradicts the task's main metric, {built.main_metric}, whose better"
    with pytest.raises(pkg.config.ConfigError, match=message):
        pkg.config.validate(compose_config(f"task={task}", f"checkpoint.mode={opposite}"))
    pkg.config.validate(compose_config(f"task={task}", f"checkpoint.mode={built.metrics[built.main_metric].value}"))


@pytest.mark.parametrize(
    "optimizer, setting",
    [("adamw", "optimizer.momentum=0.5"), ("sgd", "optimizer.beta1=0.5"), ("sgd", "optimizer.eps=0.001")],
)
def test_an_optimizer_setting_that_the_optimizer_does_not_read_is_warned_of(
    pkg, make_config, optimizer, setting, caplog
):
    cfg = make_config(f"optimizer={optimizer}", setting)
    pkg.optim.build_optimizer(cfg.optimizer, torch.nn.Linear(2, 2))
    assert f"{setting} does nothing with optimizer.name={optimizer}" in caplog.text
    caplog.clear()
    pkg.optim.build_optimizer(make_config(f"optimizer={optimizer}").optimizer, torch.nn.Linear(2, 2))
    assert "does nothing" not in caplog.text  # the optimizer's own file sets nothing it does not read


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.name=adamx", "Invalid value 'adamx', expected one of [adamw, adam, sgd]"),
        ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps=0 is out of range"),
    ],
)
def test_command_line_rejects_bad_value_and_writes_no_run_folder(tmp_path, override, expected, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    code, output = run_in_process("train.py", [override, f"hydra.run.dir={run_dir}"], capsys)  # the real train.py
    assert code != 0
    assert expected in output and "Traceback" not in output
    assert not run_dir.exists()


# A config file as an edit can leave it -> what the message says after the file's name.
BROKEN_YAML = {
    "a bracket left open": (
        "trainer:\n  max_steps: [1, 2\n",
        "is not valid YAML (line 4, column 1): ",  # PyYAML's words for it differ with libyaml
    ),
    "a line indented too far": (
        "trainer:\n  max_steps: 2\n   log_every_n_steps: 1\n",
        "is not valid YAML (line 4, ",
    ),
    "a tab for indentation": (
        "trainer:\n\tmax_steps: 2\n",
        "is not valid YAML (line 3, column 1): ",
    ),
    "a key given twice": (
        "optimizer:\n  lr: 1e-3\n  lr: 2e-3\n",
        "gives the key 'lr' twice (line 4, column 3): keep one",
    ),
}


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "sweep.py", "rank_check.py"])
@pytest.mark.parametrize("edit", sorted(BROKEN_YAML))
def test_a_config_file_that_is_not_valid_yaml_is_named_with_its_line(script, edit, tmp_path, capsys):
    """In a copy of the project whose experiment file was edited: each command names the file and the line, where
    Hydra (or PyYAML) would print a traceback."""
    shutil.copytree(PROJECT_ROOT / "configs", tmp_path / "configs")
    shutil.copy(PROJECT_ROOT / script, tmp_path)
    text, message = BROKEN_YAML[edit]
    (tmp_path / "configs" / "experiment" / "edited.yaml").write_text("# @package _global_\n" + text)
    code, output = run_in_process(str(tmp_path / script), ["experiment=edited"], capsys)
    assert code == 1 and f"{tmp_path / 'configs' / 'experiment' / 'edited.yaml'} {message}" in output, output
    assert "Traceback" not in output
    if "\t" in text:
        assert "(a tab: YAML indents with spaces)" in output


SCHEMAS = {"train": "TrainConfig", "evaluate": "EvaluateConfig", "sweep": "SweepAppConfig"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("config_name", sorted(SCHEMAS))
def test_every_key_hydra_composes_passes_the_check_of_command_line_keys(pkg, config_name, task):
    """The check before composing sees only the schema: each key of a composed config (the task's, the model's and
    the data's files included, and Hydra's own), given on the command line, passes it; and so do group choices,
    the +, ++ and ~ forms, and Hydra's options."""
    cfg = compose_config(f"task={task}", config_name=config_name, return_hydra_config=True)
    keys = pkg.runs.flatten(OmegaConf.to_container(cfg))
    others = ["model=pretrained", "experiment=smoke", "hydra/launcher=basic", "+new=1", "++trainer.max_steps=2"]
    others += ["~model.config.dropout", "-m", "--cfg", "job", "--config-name=train", "optimizer.lr=1e-3,3e-4"]
    schema = getattr(pkg.config, SCHEMAS[config_name])
    pkg.config.refuse_unknown_overrides(schema, CONFIG_DIR, [f"{key}=1" for key in keys] + others)


@pytest.mark.parametrize("config_name", sorted(SCHEMAS))
def test_a_misspelt_key_on_the_command_line_is_named_with_the_key_it_is_likely_to_be(pkg, config_name):
    """Every key of the schema with its last letter lost (Hydra would refuse it too, advising `+key=value`, which
    adds the typo): one message naming each, most with the key meant."""
    schema = getattr(pkg.config, SCHEMAS[config_name])
    keys = pkg.config._schema_keys(schema)
    typos = {key[:-1]: key for key in keys if key[:-1] not in keys}
    with pytest.raises(pkg.config.ConfigError) as refused:
        pkg.config.refuse_unknown_overrides(schema, CONFIG_DIR, [f"{typo}=1" for typo in typos])
    lines = str(refused.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(typos)
    meant = [line for line, key in zip(lines, typos.values(), strict=True) if line.endswith(f"did you mean {key}?")]
    assert len(meant) > len(typos) * 3 / 4, lines


# A value that names what is not there (an unset environment variable, a key, a resolver) -> the message's end.
UNRESOLVABLE = {
    "train.py data=files data.name=null data.files.train=${oc.env:UNSET_DIR}/train.csv": (
        "data.files.train=${oc.env:UNSET_DIR}/train.csv cannot be resolved: \"Environment variable 'UNSET_DIR' not"
    ),
    "train.py trainer.max_steps=${trainer.max_stepz}": "Interpolation key 'trainer.max_stepz' not found",
    "train.py optimizer.lr=${data.train_split}": "Value 'train' of type 'str' could not be converted to Float",
    "train.py optimizer.lr=${env:LR}": "optimizer.lr=${env:LR} cannot be resolved: Unsupported interpolation type env",
    "train.py hydra.run.dir=${oc.env:UNSET_DIR}/run": "hydra.run.dir=${oc.env:UNSET_DIR}/run cannot be resolved",
    "train.py -m hydra.sweep.dir=${oc.env:UNSET_DIR}/sweep": "hydra.sweep.dir=${oc.env:UNSET_DIR}/sweep cannot be",
    "evaluate.py model.name_or_path=${oc.env:UNSET_DIR}/model": "model.name_or_path=${oc.env:UNSET_DIR}/model cannot",
    "sweep.py sweep.storage=${oc.env:UNSET_DIR}": "sweep.storage=${oc.env:UNSET_DIR} cannot be resolved",
}


@pytest.mark.parametrize("command", sorted(UNRESOLVABLE))
def test_a_value_that_cannot_be_resolved_is_named_before_any_run_folder(command, tmp_path, monkeypatch, capsys):
    """OmegaConf raises where the value is first used, with a traceback (Hydra's own, for the run folder)."""
    monkeypatch.delenv("UNSET_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # where the run folder would be
    script, *args = command.split()
    code, output = run_in_process(script, args, capsys)
    assert code == 1 and UNRESOLVABLE[command] in output and "Traceback" not in output, output
    assert not list(tmp_path.iterdir())


def test_a_value_that_interpolates_the_run_folder_resolves_as_in_the_run(toy_overrides, tmp_path, capsys):
    """`${hydra:runtime.output_dir}` (lightning-hydra-template's `paths.output_dir`) is only set as the run starts:
    the validation before it resolves it to the run folder too."""
    interpolated = "data.subset=${hydra:runtime.output_dir}/subset"
    args = [*toy_overrides, "trainer.max_steps=1", interpolated, f"hydra.run.dir={tmp_path / 'run'}"]
    code, output = run_in_process("train.py", args, capsys)
    assert code == 0 and "cannot be resolved" not in output, output


@pytest.mark.parametrize("script", ["train.py", "sweep.py"])  # evaluate.py has train.py's groups
def test_help_lists_the_groups_and_says_which_folders_are_not_groups_of_the_command(script, capsys):
    code, output = run_in_process(script, ["--help"], capsys)
    assert code == 0 and "task: " in output and "optimizer: adamw, sgd" in output, output
    assert "configs/accelerate/ holds files for\n`accelerate launch --config_file`" in output
