"""Every file a user hands in fails with its name, the place and what to do (issue 15 item 6):
prompt files (text, JSONL and the images they name), YAML configs, checkpoint JSON, reward
checkpoints (torch and safetensors) and prompt caches. Positions are counted by hand here."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from dancegrpo.cli import main
from dancegrpo.config import ConfigError, load_config
from dancegrpo.data import load_prompts
from dancegrpo.io_errors import InputFileError, load_image, load_tensor_file, read_text
from dancegrpo.models.checkpoint_layout import CheckpointLayoutError, read_json
from dancegrpo.models.prompt_cache import PromptCache, PromptCacheWriter
from dancegrpo.preprocess import read_prompt_file
from dancegrpo.rewards.openclip_compat import read_state_dict
from dancegrpo.rewards.videoalign_release import read_release_weights

LATIN1 = "a red cat\ncafé au lait\n".encode("latin-1")  # é = 0xE9: line 2, column 4, byte offset 13


def assert_names_utf8_problem(message: str, path, line: int, column: int, offset: int) -> None:
    assert f"{path}:{line}:{column}:" in message
    assert "0xe9" in message and f"byte offset {offset}" in message
    assert "iconv -f latin1 -t utf-8" in message and "UTF-8" in message


# ------------------------------------------------------------------ text: prompt files, configs

def test_non_utf8_prompt_file_names_file_line_column_and_the_fix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(LATIN1)
    for read in (load_prompts, read_prompt_file):
        with pytest.raises(ValueError) as info:
            read(str(path))
        assert_names_utf8_problem(str(info.value), path, 2, 4, 13)
        assert "caf\\\\xe9 au lait" in str(info.value)  # the line, the bad byte shown escaped


def test_column_counts_characters_after_multibyte_ones(tmp_path):
    path = tmp_path / "p.txt"
    # line 3 starts at byte 4; "naïve " is 6 characters but 7 bytes (ï = c3 af): the bad byte is character 7
    path.write_bytes(b"a\nb\n" + "naïve ".encode() + b"\xff!\n")
    with pytest.raises(InputFileError, match=re.escape(f"{path}:3:7:") + r".*0xff at byte offset 11"):
        read_text(path, "prompt file")


def test_utf8_prompts_still_read(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("café au lait\n\nnaïve\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["café au lait", "naïve"]


def test_non_utf8_jsonl_and_bad_json_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a cat"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError) as info:
        read_prompt_file(path)
    assert_names_utf8_problem(str(info.value), path, 2, 16, 35)
    path.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog",}\n')
    # line 3, column 20: the "}" after the trailing comma (the 20th character of the line)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:20: JSONL prompt line is not valid JSON")):
        read_prompt_file(path)


def test_jsonl_images_missing_corrupt_or_not_images_name_file_and_line(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    noise = tmp_path / "noise.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(noise)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(noise.read_bytes()[: noise.stat().st_size // 2])
    (tmp_path / "text.png").write_text("not an image")
    path = tmp_path / "i2v.jsonl"

    def lines(second_image):
        path.write_text(json.dumps({"prompt": "a", "image": "good.png"}) + "\n"
                        + json.dumps({"prompt": "b", "image": second_image}) + "\n")
    lines("good.png")
    assert [e["image"] for e in read_prompt_file(path)] == [str(good), str(good)]
    lines("absent.png")
    with pytest.raises(FileNotFoundError, match=re.escape(f"absent.png' (named at {path}:2) not found")):
        read_prompt_file(path)
    lines("cut.jpg")
    with pytest.raises(InputFileError, match=re.escape(f"cut.jpg' (named at {path}:2) is corrupt or truncated")):
        read_prompt_file(path)
    lines("text.png")
    with pytest.raises(InputFileError, match=re.escape(f"(named at {path}:2) is not an image PIL can read")):
        read_prompt_file(path)
    lines(5)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: \"image\" must be a path string")):
        read_prompt_file(path)
    assert load_image(good).size == (8, 8)


def test_config_yaml_not_utf8_or_not_yaml_names_file_line_and_column(tmp_path, tiny_config):
    path = tmp_path / "run.yaml"
    text = yaml.safe_dump(tiny_config, sort_keys=False)
    path.write_bytes(text.encode() + b"# caf\xe9\n")
    line = text.count("\n") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_names_utf8_problem(str(info.value), path, line, 6, len(text.encode()) + 5)
    path.write_text("run:\n  seed: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3:6: config file is not valid YAML")):
        load_config(path)


def test_cli_train_and_preprocess_report_the_file_and_line_in_one_line(tmp_path, tiny_config, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(LATIN1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", "--config", str(config), "--set", f"data.train_prompts={prompts}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dancegrpo: error: ") and err.count("\n") == 1
    assert_names_utf8_problem(err, prompts, 2, 4, 13)
    assert main(["preprocess", "--model", "flux", "--path", str(tmp_path / "no_model"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dancegrpo: error: ") and err.count("\n") == 1
    assert_names_utf8_problem(err, prompts, 2, 4, 13)


def test_checkpoint_json_not_utf8_or_not_json(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_bytes(b'{"_class_name": "caf\xe9"}')
    with pytest.raises(CheckpointLayoutError) as info:
        read_json(path, "flux")
    assert_names_utf8_problem(str(info.value), path, 1, 21, 20)
    path.write_text('{"a": 1,\n "b": }\n')
    with pytest.raises(CheckpointLayoutError, match=re.escape(f"{path}:2:7: checkpoint file is not valid JSON")):
        read_json(path)


# ------------------------------------------------------------------ tensors: reward checkpoints, caches

class NotATensor:
    pass


@pytest.mark.parametrize("reader", [read_state_dict, read_release_weights])
def test_reward_checkpoints_truncated_foreign_or_pickled_objects(tmp_path, reader):
    state = {"w": torch.arange(64, dtype=torch.float32)}
    torch.save({"state_dict": state}, tmp_path / "hps.pt")
    whole = (tmp_path / "hps.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputFileError, match=r"'.*cut\.pt' \(\d+ bytes\) cannot be loaded: it is truncated, corrupt"):
        reader(tmp_path / "cut.pt")
    torch.save({"w": NotATensor()}, tmp_path / "objects.pt")
    with pytest.raises(InputFileError, match=r"objects\.pt.*pickles objects other than tensors.*torch\.save"):
        reader(tmp_path / "objects.pt")
    with pytest.raises(FileNotFoundError, match=r"absent\.pt' not found"):
        reader(tmp_path / "absent.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    whole = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-40])
    with pytest.raises(InputFileError, match=r"cut\.safetensors' \(\d+ bytes\) is not a complete safetensors file"):
        reader(tmp_path / "cut.safetensors")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt' do(es)? not hold a state dict of tensors"):
        reader(tmp_path / "list.pt")
    assert torch.equal(reader(tmp_path / "w.safetensors")["w"], state["w"])


def test_load_tensor_file_reads_torch_and_safetensors(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "x.pth")
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert torch.equal(load_tensor_file(tmp_path / "x.pth", "weights")["a"], torch.ones(2))
    assert torch.equal(load_tensor_file(tmp_path / "x.safetensors", "weights")["a"], torch.ones(2))


def test_prompt_cache_with_a_truncated_shard_or_bad_index_is_refused_when_opened(tmp_path):
    writer = PromptCacheWriter(tmp_path / "c", "flux", meta={}, shard_size=2)
    writer.add(["a", "b", "c"], {"e": torch.randn(3, 16)})
    writer.close()
    assert len(PromptCache(tmp_path / "c", "flux")) == 3
    shard = tmp_path / "c" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(InputFileError, match=r"prompt cache shard '.*shard_00001\.safetensors' \(\d+ bytes\) is not a "
                                             r"complete safetensors file"):
        PromptCache(tmp_path / "c", "flux")
    index = tmp_path / "c" / "index.json"
    index.write_bytes(b"{\n  \"format\": 1,,\n}")
    with pytest.raises(InputFileError, match=re.escape(f"{index}:2:15: prompt cache index is not valid JSON")):
        PromptCache(tmp_path / "c", "flux")
