"""Reading the gateway's ``/metrics`` in tests: parse the exposition, sum samples by label subset."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, as (sample name, labels) -> value."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parse Prometheus text exposition."""
        samples = tuple(
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        )
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(key) == wanted for key, wanted in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value ``label`` takes in the samples called ``name``."""
        return {labels[label] for sample, labels, _ in self.samples if sample == name and label in labels}
