"""Shard formats, object storage, Ray Data readers, preprocessing and dataset builders."""
