// Rule verifiers: named, deterministic functions that score a model response against a reference
// answer with a reward in [0, 1]. GRPO's rule rewards, the reward server and `ptk eval` share them.
// Not a reward model (see reward/ rm) and not a symbolic algebra system: equivalence is numeric
// for numbers and normalised-string for everything else. All functions are pure and thread-safe.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ptk::reward {

// --- Answer extraction and comparison (the building blocks of `math`) ---------------------------

// The final answer stated in `response`, trying in order (the last occurrence of each wins):
//   1. GSM8K's `#### N`           -> the rest of that line
//   2. `\boxed{...}` / `\fbox{...}` -> the braces' content, nested braces kept ("\boxed{\frac{1}{2}}")
//   3. "answer is X" (any case, so "The final answer is X") -> a leading number of X if X starts
//      with one ("The answer is 42. Next..." -> "42"), else X up to the end of the line, a trailing
//      period and surrounding `$` removed
//   4. the last number in the text ("-1,234.5", "3/4")
// nullopt when none applies (no number anywhere).
std::optional<std::string> extract_final_answer(std::string_view response);

// A number written the way answers write them, or nullopt: sign, thousands commas only in groups
// of three ("1,000" yes, "1,00" and "1,-2" no), decimals, a leading `$`/`\$`, a trailing `%`/`\%`
// (stripped, not divided: "50%" -> 50), surrounding `$...$`, simple fractions "3/4", "-3/4",
// "\frac{3}{4}", "\dfrac34", "-\frac{3}{4}". Leading and trailing whitespace is ignored.
std::optional<double> parse_number(std::string_view text);

// Canonical text of a non-numeric answer (MATH style): strips `$`, `\left`/`\right`, spacing
// commands (`\!`, `\,`, `\;`, `\ `), `^\circ`, `\%`, `\text{..}`/`\textbf{..}`/`\mbox{..}` wrappers
// (content kept), `\dfrac`/`\tfrac` -> `\frac`, a leading "x=" style single-letter left side, a
// trailing period, and all whitespace.
std::string normalize_answer(std::string_view text);

// True when two answers agree: both parse as numbers and are equal to 1e-6 relative (1,000 = 1000 =
// 1000.0, 3/4 = 0.75 = \frac{3}{4}), or their normalize_answer() texts are identical (and not empty).
bool answers_equivalent(std::string_view a, std::string_view b);

// --- Verifiers: (response, reference) -> reward in [0, 1] -------------------------------------

// `math`: 1 when the response's extract_final_answer() is answers_equivalent() to the reference,
// else 0. A reference that itself contains `#### ` or `\boxed{` is extracted the same way first,
// so a whole GSM8K solution works as a label. An empty reference scores 0.
double verify_math(std::string_view response, std::string_view reference);

// `exact`: 1 when response and reference are equal after trimming and collapsing every run of
// whitespace to one space; case and punctuation count.
double verify_exact(std::string_view response, std::string_view reference);

// `format_think`: 1 when the whole response is `<think>...</think>` then `<answer>...</answer>`
// (DeepSeek-R1 style): each tag exactly once, in that order, both bodies non-blank, only whitespace
// outside them. The reference is ignored.
double verify_format_think(std::string_view response, std::string_view reference);

// `format_answer`: 1 when the response, trailing whitespace aside, ends with the sentence
// "The answer is N." where N parses as a number (parse_number) — the arithmetic demo's format.
// The reference is ignored; correctness is `math`'s job.
double verify_format_answer(std::string_view response, std::string_view reference);

// --- Registry: a closed set, so recipes name verifiers (`grpo.verifiers: ["math"]`) -------------

using VerifierFn = double (*)(std::string_view response, std::string_view reference);

struct Verifier {
  const char* name;     // what recipes and --verifier use
  const char* summary;  // one line for --help
  VerifierFn fn;
};

// Every verifier, in a stable order.
const std::vector<Verifier>& verifiers();

// The verifier called `name`; throws ptk::Error listing the known names (and the nearest) otherwise.
const Verifier& find_verifier(std::string_view name);

// "math, exact, format_think, format_answer" — for help texts and error messages.
std::string verifier_names();

}  // namespace ptk::reward
