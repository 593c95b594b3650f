"""After a step: sampled tokens become text and outputs.

Each new token is appended to its sequence and checked against the stop conditions in order: a
stop token or EOS, a stop string in the decoded text (the text is cut where it starts), then
`max_tokens` and the context length. Outputs carry what is new since the caller's last output;
while a request runs, text that could still turn out to be the start of a stop string is held
back, so a stream never shows text that a stop string later removes.
"""

from __future__ import annotations

from engine.detokenizer import check_stop_token, find_stop, stop_holdback
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import TokenLogprob
from engine.sequence import Sequence
from engine.sequence_group import SequenceGroup


class Postprocessor:
    """Appends sampled tokens to their sequences and builds the request outputs.

    `eos_token_ids` end a request (unless it ignores EOS); `max_model_len` is the context length a
    sequence may not pass. Finishing a request (freeing its blocks) is the caller's: `append_token`
    returns the finish reason.
    """

    def __init__(self, eos_token_ids: list[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, pick: TokenLogprob, now: float) -> str | None:
        """Appends one sampled token (and its text); returns why the sequence ended, or None."""
        req = seq.request
        token = pick.token_id
        req.output_token_ids.append(token)
        if req.params.logprobs is not None:
            req.logprobs.append(pick)
        if req.first_token_time is None:
            req.first_token_time = now
        reason = check_stop_token(req, token, self.eos_token_ids)
        if reason is not None:
            if token in req.params.stop_token_ids:
                req.stop_reason = token  # EOS reports no stop reason, as OpenAI-style APIs do
            return reason
        if seq.detok is not None:
            new_text = seq.detok.step([token])
            if new_text:
                seq.text += new_text
                if req.params.stop and len(req.output_token_ids) >= req.params.min_tokens:
                    hit = find_stop(seq.text, len(new_text), req.params.stop)
                    if hit is not None:
                        index, stop = hit
                        seq.text = seq.text[:index]
                        req.stop_reason = stop
                        return "stop"
        if len(req.output_token_ids) >= req.params.max_tokens or req.num_known_tokens >= self.max_model_len:
            if seq.detok is not None:
                seq.text += seq.detok.flush()  # a character left incomplete at the end
            return "length"
        return None

    @staticmethod
    def output(group: SequenceGroup, final: bool) -> RequestOutput:
        """The group's output now, with the text and tokens new since its last output."""
        completions = []
        for i, seq in enumerate(group.seqs):
            req = seq.request
            done = req.is_finished
            visible = len(seq.text)
            if not done and req.params.stop:
                visible -= stop_holdback(seq.text, req.params.stop)
            visible = max(visible, seq.emitted_chars)
            delta_text = seq.text[seq.emitted_chars:visible]
            delta_ids = req.output_token_ids[seq.emitted_tokens:]
            seq.emitted_chars, seq.emitted_tokens = visible, len(req.output_token_ids)
            # Only a final output gets copies; a step's output shares the live lists (its callers
            # read the deltas), which keeps a step's cost independent of how long outputs are.
            token_ids = list(req.output_token_ids) if final else req.output_token_ids
            logprobs = None
            if req.params.logprobs is not None:
                logprobs = list(req.logprobs) if final else req.logprobs
            completions.append(CompletionOutput(
                index=i, text=seq.text[:visible], token_ids=token_ids,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=logprobs, delta_text=delta_text, delta_token_ids=delta_ids))
        first = group.seqs[0].request
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            outputs=completions, finished=final, prompt_tokens=len(group.prompt_token_ids),
            cached_tokens=first.num_cached_tokens, arrival_time=first.arrival_time,
            first_token_time=min((s.request.first_token_time for s in group.seqs
                                  if s.request.first_token_time is not None), default=None),
            finish_time=max((s.request.finish_time or 0.0 for s in group.seqs), default=None) if final else None)
