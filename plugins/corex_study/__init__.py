"""corex_study: studies over arms, seeds and label fractions; paired comparisons; reports (work in progress)."""
