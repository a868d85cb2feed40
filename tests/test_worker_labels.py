"""A registry entry whose labels do not fit the model's output fails its requests, not the worker."""

import threading

import models
from conftest import MODEL
from test_worker import drain, pending_count, reply, send


def test_labels_that_do_not_match_the_first_output_fail_the_batch_with_internal(r, settings, registry,
                                                                                 model_path):
    mv = registry.register(MODEL, model_path, input_spec=models.SPEC, output_names=["probs"],
                           labels=["down", "up"])  # the model has three classes
    registry.promote(MODEL, mv.version)
    for i in range(3):
        send(r, f"q{i}")
    # Before, building the replies raised IndexError in the worker's loop: the batch was read again
    # and again until it was dead-lettered, the bots waiting out their timeouts meanwhile.
    runner = threading.Thread(target=drain, args=(settings,), daemon=True)
    runner.start()
    runner.join(15)
    assert not runner.is_alive(), "the worker kept retrying the batch instead of answering it"
    for i in range(3):
        answer = reply(r, f"q{i}")
        assert answer["ok"] is False and answer["error"]["code"] == "INTERNAL"
        assert "2 labels but its first output has 3 columns" in answer["error"]["message"]
    assert pending_count(r) == 0
