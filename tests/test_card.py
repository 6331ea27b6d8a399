"""effnetv2.card: the evaluation section, the model-index, and a card written with every save."""
from effnetv2 import EfficientNetV2
from effnetv2.card import CARD_BEGIN, card_section, update_card


def test_card_section_is_inserted_once(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# Model\n\n## Architecture\n\nblocks\n")
    result = {"images": 10, "accuracy": 0.98, "per_class_accuracy": {"circle": 1.0}, "attention_mass_in_box": 0.5,
              "box_area_share": 0.2, "mass_over_share": 2.5, "images_with_mass_above_share": 0.9,
              "attention_mass_in_box_per_head": [0.4, 0.6]}
    for _ in range(2):
        update_card(card, card_section(result, tmp_path, "python -m effnetv2.evaluate ..."))
    text = card.read_text()
    assert text.count(CARD_BEGIN) == 1 and "| accuracy | 0.9800 |" in text
    assert text.index(CARD_BEGIN) < text.index("## Architecture")


def test_model_index_carries_the_measured_accuracy_and_validates(tmp_path):
    """The YAML front matter as the Hub reads it: huggingface_hub parses model-index back into
    EvalResult objects (and would raise on a malformed one)."""
    from huggingface_hub import ModelCard

    from effnetv2 import EfficientNetV2
    from effnetv2.card import generate_model_card

    model = EfficientNetV2("b0", num_classes=3, id2label={0: "a", 1: "b", 2: "c"})
    card = generate_model_card(model, repo_id="org/flowers", metrics={"accuracy": 0.9123, "val_loss": 0.3},
                               dataset_name="flower_photos", base_model="org/base")
    (tmp_path / "README.md").write_text(str(card))
    data = ModelCard.load(tmp_path / "README.md").data
    [result] = data.eval_results
    assert (result.task_type, result.dataset_name, result.dataset_split) == ("image-classification", "flower_photos",
                                                                            "validation")
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.9123)
    assert data.model_name == "org/flowers" and data.base_model == "org/base"
    assert data.to_dict()["base_model_relation"] == "finetune"
    plain = ModelCard(str(generate_model_card(model))).data  # nothing measured: no model-index, no relation
    assert plain.eval_results is None and "base_model_relation" not in plain.to_dict()


def test_every_save_writes_the_card_of_its_weights(tmp_path):
    """huggingface_hub's save_pretrained keeps an existing README.md: the second model's card must win."""
    EfficientNetV2("b0", num_classes=2, id2label={0: "cat", 1: "dog"}).save_pretrained(
        tmp_path, model_card_kwargs={"metrics": {"accuracy": 0.25}})
    EfficientNetV2("b0", num_classes=3, id2label={0: "ant", 1: "bee", 2: "fly"}).save_pretrained(
        tmp_path, model_card_kwargs={"metrics": {"accuracy": 0.75}})
    card = (tmp_path / "README.md").read_text()
    assert "| accuracy | 0.75 |" in card and "0.25" not in card
    assert "`ant`" in card and "`cat`" not in card


def test_card_links_only_to_what_exists_and_names_no_local_path(tmp_path):
    """No placeholder repository link (the library has no public home yet: plain name), a real one when
    the class is given its URL; the bundled card names its local starting weights by folder name only."""
    import re
    from pathlib import Path

    from effnetv2.card import generate_model_card

    model = EfficientNetV2("b0", num_classes=2, id2label={0: "cat", 1: "dog"})
    links = re.findall(r"\]\((https?://[^)]+)\)", str(generate_model_card(model)))
    assert not [link for link in links if "github.com" in link], links
    model._hub_mixin_info.repo_url = "https://example.org/effnetv2"  # what a class with a home would carry
    try:
        assert "[effnetv2](https://example.org/effnetv2) library" in str(generate_model_card(model))
    finally:
        model._hub_mixin_info.repo_url = None
    bundled = (Path(__file__).parents[1] / "assets" / "model" / "README.md").read_text()
    rows = dict(re.findall(r"^\| (initial weights) \| (.*) \|$", bundled, flags=re.M))
    assert "/" not in rows["initial weights"], rows
    assert "github.com/effnetv2" not in bundled
