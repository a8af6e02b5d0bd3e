from bcr_verify.testing import PrefixCacheConformance
from dynamo_prefix_cache import chain_hashes, make_cache


class TestDynamoPrefixCache(PrefixCacheConformance):
    make_cache = staticmethod(make_cache)
    block_hashes = staticmethod(chain_hashes)

    @staticmethod
    def install_mutation_callback(cache, callback):
        cache.event_listener = lambda event: callback()
