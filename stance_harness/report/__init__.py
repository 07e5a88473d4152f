"""Reports: metric directions, test records, the gate, the store of report folders and
baselines, and the renderers (Markdown, HTML) of one neutral view of each section."""
