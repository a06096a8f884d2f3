"""`rs5m rate`: human rating of image-text pairs straight from shards (RS5M's rating tool).

draw.py    the rating queue: a seeded sample of a shard set, spread over sources and shards
ratings.py the append-only ratings file (RS5M's CSV columns + rater, time, sample, shard)
server.py  the web app (Flask, one plain HTML/JS page in static/)
summary.py the paper's table (mean ± std per source, n) and inter-rater agreement
"""
