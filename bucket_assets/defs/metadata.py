"""Materialization metadata helpers shown in the Dagster UI."""


import dagster as dg


def md_counts(rows: list[tuple], header: tuple[str, str] = ("value", "count")) -> dg.MarkdownMetadataValue:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"] + [f"| {k} | {v:,} |" for k, v in rows]
    return dg.MetadataValue.md("\n".join(lines))
