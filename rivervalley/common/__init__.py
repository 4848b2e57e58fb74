"""Plumbing both packages share, named as such (extramerge imports it; it imports neither package's math):

* ``publish``: staging → publish → clean-up of every output, the folder-claim rule, the output marker;
* ``cli``: the one error scheme of the command-line tools (one line, fixed exit statuses);
* ``resources``: memory available and the guard before a large allocation, cores, scoped torch settings;
* ``plotting``: the one figure style and the paper figures' save helpers;
* ``formatting``: one bytes formatter, one JSON converter.
"""
