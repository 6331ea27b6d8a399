"""effnetv2.card: the evaluation section is placed before the architecture and replaced on a re-run."""
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
