"""Parameter summary: the backbone must be exactly SD 1.5's UNet."""

from model.training.summary import format_summary, main, parameter_summary

SD15_UNET_PARAMETERS = 859_520_964


def test_full_backbone_and_reference_net_match_sd15():
    counts = dict(parameter_summary("full"))
    assert counts["denoising UNet: SD 1.5 image layers"] == SD15_UNET_PARAMETERS
    assert counts["ReferenceNet (SD 1.5 layout)"] == SD15_UNET_PARAMETERS
    assert all(n > 0 for n in counts.values())


def test_tiny_summary_is_small_and_printable(capsys):
    rows = parameter_summary("tiny")
    assert sum(n for _, n in rows) < 5_000_000
    table = format_summary("tiny")
    assert "temporal attention" in table and "VP-Flow" in table
    main(["--size", "tiny"])
    assert "generator total" in capsys.readouterr().out
