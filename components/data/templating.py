"""Chat formatting and tokenisation with assistant-only loss masks.

user = problem + "\\n" + instruction; assistant = the worked solution (SFT-1) or
"<think>\\n" + trace + "\\n</think>\\n" + final answer with \\boxed{} (SFT-2). The text is rendered with
the teacher's own chat template and tokenised once with character offsets; a token is an assistant
token when its characters fall inside the assistant's content, and the special token that closes the
assistant turn (<|im_end|> for SmolLM2) is one too. Everything else (system turn, user turn, role
headers, the newline after the end-of-turn token) has loss_mask 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from components.data.record import Record


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]
    prompt_tokens: int
    end_of_turn: bool = False  # the special token closing the assistant turn carries loss (it teaches stopping)


class Formatter:
    def __init__(self, tokenizer, instruction: str, system_prompt: str | None = None):
        self.tok = tokenizer
        self.instruction = instruction
        self.system_prompt = system_prompt
        # The end-of-turn token after the assistant's content is found among the special tokens: the named ones
        # (bos, eos, pad...) and every added token marked special, so that a tokenizer whose named EOS is another
        # token (transformers 5.17 loads SmolLM2's GGUF with EOS = <|im_start|>) still gets <|im_end|> its loss.
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}

    def user_text(self, problem: str) -> str:
        return f"{problem}\n{self.instruction}" if self.instruction else problem

    def messages(self, problem: str, assistant: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": self.user_text(problem)})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
        return msgs

    def prompt(self, problem: str) -> str:
        """Chat-templated text ending with the assistant generation prompt (RL / evaluation)."""
        return self.tok.apply_chat_template(self.messages(problem), tokenize=False, add_generation_prompt=True)

    @staticmethod
    def assistant_text(rec: Record) -> str:
        if rec.split == "sft2":
            final = rec.metadata.get("final") or f"The final answer is $\\boxed{{{rec.answer}}}$."
            return f"<think>\n{rec.solution.strip()}\n</think>\n{final.strip()}"
        return rec.solution.strip()

    def render(self, rec: Record) -> tuple[str, int, int] | None:
        """(full text, start, end) of the assistant content within the templated conversation; None when
        the chat template rewrote the content (some templates drop reasoning), so no mask can be built."""
        content = self.assistant_text(rec)
        full = self.tok.apply_chat_template(self.messages(rec.problem, content), tokenize=False)
        # The assistant turn is the last one, so its content is the last occurrence (one render, not two).
        pos = full.rfind(content)
        if pos < 0:
            return None
        return full, pos, pos + len(content)

    def encode(self, recs: list[Record]) -> list[Encoded | None]:
        """One Encoded per record (None where render() failed), tokenised in one batch."""
        rendered = [self.render(r) for r in recs]
        ok = [x for x in rendered if x is not None]
        enc = self.tok([t for t, _, _ in ok], add_special_tokens=False, return_offsets_mapping=True) if ok else None
        done = iter(zip(ok, enc["input_ids"], enc["offset_mapping"])) if ok else iter(())
        out: list[Encoded | None] = []
        for x in rendered:
            if x is None:
                out.append(None)
                continue
            (text, a0, a1), ids, offs = next(done)
            mask = [0] * len(ids)
            prompt_tokens = 0
            last = -1
            for t, (s, e) in enumerate(offs):
                if e <= a0:
                    prompt_tokens = t + 1
                if s < a1 and e > a0 and e > s:
                    mask[t] = 1
                    last = t
            # The end-of-turn token right after the content is what teaches the model to stop.
            nxt = last + 1
            while 0 <= last and nxt < len(ids) and offs[nxt][0] < offs[nxt][1] and text[offs[nxt][0]:offs[nxt][1]].isspace():
                nxt += 1
            eot = last >= 0 and nxt < len(ids) and ids[nxt] in self.special_ids
            if eot:
                mask[nxt] = 1
            out.append(Encoded(list(ids), mask, prompt_tokens, eot))
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]
